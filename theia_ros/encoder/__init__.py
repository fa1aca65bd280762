"""The Theia encoder, plain Python: config (variants, config.json, the encoder's defaults and
choices), checkpoint (the published key layout), hub (hub ids -> local files), model (the network
built from config.json + model.safetensors) and pipeline (frames -> features, what the node and the
bag tools run)."""
