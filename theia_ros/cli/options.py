"""Options several verbs share, each declared once here so that their defaults and choices cannot drift.

Encoder options take their defaults from :data:`theia_ros.encoder.config.ENCODER_DEFAULTS` and their
choices from the same tuples as the encoder node's parameters; bag output options from
:mod:`theia_ros.bags.io`. A verb picks the options it takes by name.
"""
from theia_ros.bags.io import BAG_VERSIONS, DEFAULT_BAG_VERSION, DEFAULT_STORAGE, STORAGES
from theia_ros.encoder.config import (
    BACKEND_CHOICES,
    DEFAULT_MODEL,
    ENCODER_DEFAULTS,
    OUTPUT_DTYPE_CHOICES,
    PRECISION_CHOICES,
)
from theia_ros.features import (
    DEFAULT_POS_INTERPOLATION,
    DEFAULT_PREPROCESSING,
    POS_INTERPOLATIONS,
    PREPROCESSING_PROFILES,
)
from theia_ros.representations import REPRESENTATIONS, TEACHER_PREFIX

SOURCE_HELP = (f"checkpoint directory, hub id ({DEFAULT_MODEL}) or random:<variant> (random weights: right "
               "speed, meaningless features)")

#: name -> (flags, argparse keyword arguments)
ENCODER_OPTIONS = {
    "model": (("--model",), dict(
        default=ENCODER_DEFAULTS["model"], metavar="SOURCE",
        help=f"checkpoint directory, hub id or random:<variant> (default {ENCODER_DEFAULTS['model']})")),
    "seed": (("--seed",), dict(
        type=int, default=ENCODER_DEFAULTS["seed"],
        help=f"seed of random:<variant> weights (default {ENCODER_DEFAULTS['seed']})")),
    "backend": (("--backend",), dict(
        default=ENCODER_DEFAULTS["backend"], choices=BACKEND_CHOICES,
        help=f"inference backend; auto: the fastest one here that passes the accuracy gate (default "
             f"{ENCODER_DEFAULTS['backend']})")),
    "precision": (("--precision",), dict(
        default=ENCODER_DEFAULTS["precision"], choices=PRECISION_CHOICES,
        help=f"inference precision (default {ENCODER_DEFAULTS['precision']})")),
    "device": (("--device",), dict(
        default=ENCODER_DEFAULTS["device"],
        help=f"auto (a CUDA GPU if present, else the CPU), cpu or cuda[:N] (default {ENCODER_DEFAULTS['device']})")),
    "representation": (("--representation",), dict(
        default=ENCODER_DEFAULTS["representation"],
        help=f"{', '.join(REPRESENTATIONS)} or {TEACHER_PREFIX}<teacher id> (default "
             f"{ENCODER_DEFAULTS['representation']})")),
    "dtype": (("--dtype",), dict(
        default=ENCODER_DEFAULTS["output_dtype"], choices=OUTPUT_DTYPE_CHOICES,
        help=f"dtype of the features written (default {ENCODER_DEFAULTS['output_dtype']})")),
    "threads": (("--threads",), dict(
        type=int, default=ENCODER_DEFAULTS["threads"], help="torch intra-op threads (0: torch's default)")),
    "preprocessing": (("--preprocessing",), dict(
        default=DEFAULT_PREPROCESSING, choices=PREPROCESSING_PROFILES,
        help="theia: the reference (resize to 224x224 or --input-size, [-1, 1]); isaaclab: Isaac Lab's "
             "image_features (the image's own size unless --input-size, ImageNet mean/std; docs/isaaclab.md) "
             f"(default {DEFAULT_PREPROCESSING})")),
    "input_size": (("--input-size",), dict(
        type=int, nargs=2, metavar=("H", "W"), default=None,
        help="height and width the model sees (the patch grid is H//16 x W//16); default: 224x224 for theia, "
             "each image's own size for isaaclab")),
    "pos_interpolation": (("--pos-interpolation",), dict(
        default=DEFAULT_POS_INTERPOLATION, choices=POS_INTERPOLATIONS,
        help="position-embedding interpolation to grids other than 14x14: scale_factor as transformers <= 4.44 "
             f"(the checkpoints' config.json), size as >= 4.45 (default {DEFAULT_POS_INTERPOLATION})")),
    "max_batch": (("--max-batch",), dict(
        type=int, default=ENCODER_DEFAULTS["max_batch"],
        help=f"largest batch one inference takes (default {ENCODER_DEFAULTS['max_batch']})")),
}


def add_encoder_options(parser, *names, helps=None):
    """Add the encoder options `names` (keys of ENCODER_OPTIONS) to `parser` (a parser or an argument
    group). `helps`: name -> help text, where a verb gives an option's value a meaning of its own."""
    helps = helps or {}
    unknown = set(names).union(helps).difference(ENCODER_OPTIONS)
    if unknown:
        raise ValueError(f"unknown encoder option(s) {', '.join(sorted(unknown))}")
    for name in names:
        flags, kwargs = ENCODER_OPTIONS[name]
        parser.add_argument(*flags, **(kwargs | ({"help": helps[name]} if name in helps else {})))


def add_source_argument(parser):
    """The positional SOURCE of the verbs that load a checkpoint by itself (info, export, bench)."""
    parser.add_argument("source", metavar="SOURCE", help=SOURCE_HELP)


def add_bag_output_options(parser, overwrite_help="replace OUT if it is an existing bag"):
    """--storage, --bag-version, --overwrite of the verbs that write a new bag."""
    parser.add_argument("--storage", default=DEFAULT_STORAGE, choices=STORAGES,
                        help=f"output storage (default {DEFAULT_STORAGE})")
    parser.add_argument("--bag-version", type=int, default=DEFAULT_BAG_VERSION, choices=BAG_VERSIONS,
                        help=f"rosbag2 metadata version: 9 Jazzy+ (default {DEFAULT_BAG_VERSION}), 8 for older "
                             "players (see docs/bags.md)")
    parser.add_argument("--overwrite", action="store_true", help=overwrite_help)


#: the encoder options of encode-bag and encode-bags
ENCODE_BAG_ENCODER_OPTIONS = ("model", "seed", "backend", "precision", "device", "representation", "dtype",
                              "preprocessing", "input_size", "pos_interpolation", "threads")


def add_encode_bag_options(parser, threads_help=None, overwrite_help=None):
    """Everything encode-bag and encode-bags take besides their inputs and outputs: the encoder group,
    --cameras, --batch, --no-copy and the bag output options (one declaration, so both verbs write the same)."""
    from theia_ros.bags.encode import DEFAULT_BATCH

    add_encoder_options(parser.add_argument_group("encoder"), *ENCODE_BAG_ENCODER_OPTIONS,
                        helps={"threads": threads_help} if threads_help else None)
    parser.add_argument("--cameras", nargs="+", metavar="TOPIC[=FEATURES_TOPIC]",
                        help="camera topics to encode (default: every Image/CompressedImage topic)")
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH,
                        help=f"frames per inference, also the encoder's largest batch (default {DEFAULT_BATCH})")
    parser.add_argument("--no-copy", action="store_true", help="write only the feature topics")
    add_bag_output_options(parser, **({"overwrite_help": overwrite_help} if overwrite_help else {}))
