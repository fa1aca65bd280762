"""The Theia encoder, plain Python: the model built from config.json + model.safetensors, and the
batch-encoding pipeline (frames -> features) the node and the bag tools run."""
