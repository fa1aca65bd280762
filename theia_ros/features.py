"""Pack feature tensors into `theia_ros/Features` messages and read them back.

Plain Python: works with the rosidl-built message classes (rclpy) and with any object that has the
same fields (e.g. messages deserialised by the `rosbags` library on a machine without ROS).

Wire format: `data` holds the tensor's bytes, little-endian, C order; `shape` and `dtype` say how
to read them. Reading never copies: the returned array is a read-only view of the message buffer.

Each message also says how its image became the model's input (`preprocessing`, `pos_interpolation`,
`input_size`, `patch_grid`; empty in messages from before those fields: the reference preprocessing at
224x224). :func:`preprocessing_of` reads them as a :class:`Preprocessing`, whose
:meth:`~Preprocessing.mismatch` tells whether features fit a policy trained on other features.
"""
import array
import dataclasses
import math
import sys

import numpy as np

try:  # numpy has no bfloat16 of its own; ml_dtypes (a dependency of onnx and jax) provides one
    import ml_dtypes

    _NP_BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover - exercised only where ml_dtypes is absent
    ml_dtypes = None
    _NP_BFLOAT16 = None

# Values of Features.DTYPE_* (kept here so that packing works without the generated messages).
DTYPE_FLOAT32 = 0
DTYPE_FLOAT16 = 1
DTYPE_BFLOAT16 = 2

DTYPE_NAMES = {DTYPE_FLOAT32: "float32", DTYPE_FLOAT16: "float16", DTYPE_BFLOAT16: "bfloat16"}
DTYPE_CODES = {name: code for code, name in DTYPE_NAMES.items()}
_ITEMSIZE = {DTYPE_FLOAT32: 4, DTYPE_FLOAT16: 2, DTYPE_BFLOAT16: 2}
_NP_DTYPES = {DTYPE_FLOAT32: np.dtype("<f4"), DTYPE_FLOAT16: np.dtype("<f2")}

MAX_RANK = 8
_UINT32_MAX = 2**32 - 1


# Preprocessing profiles and position-embedding interpolations: the values of Features.preprocessing and
# Features.pos_interpolation, the same names as theia_ros.preprocess.PROFILES and POS_INTERPOLATIONS (repeated
# here so that reading messages needs no torch; test/test_isaaclab_graph.py checks that they agree).
PREPROCESSING_PROFILES = ("theia", "isaaclab")
POS_INTERPOLATIONS = ("scale_factor", "size")
DEFAULT_PREPROCESSING = "theia"
DEFAULT_POS_INTERPOLATION = "scale_factor"
REFERENCE_INPUT_SIZE = (224, 224)  # the theia profile's input without a size of its own
REFERENCE_GRID = (14, 14)
PATCH_SIZE = 16


class FeaturesFormatError(ValueError):
    """A features message whose shape, dtype and data do not agree."""


@dataclasses.dataclass(frozen=True)
class Preprocessing:
    """How images became the model's input: what a features message records and a policy was trained on.

    profile: "theia" (the reference: resize, [-1, 1]) or "isaaclab" (Isaac Lab: ImageNet mean/std).
    input_size: (height, width) the model saw; None: not known (an Isaac Lab profile at the camera's
        own resolution, for a policy that does not record it).
    pos_interpolation: "scale_factor" (transformers <= 4.44) or "size" (>= 4.45): how the position
        embeddings reach a patch grid other than 14x14.
    """

    profile: str = DEFAULT_PREPROCESSING
    input_size: tuple | None = REFERENCE_INPUT_SIZE
    pos_interpolation: str = DEFAULT_POS_INTERPOLATION

    def __post_init__(self):
        if self.profile not in PREPROCESSING_PROFILES:
            raise ValueError(f"preprocessing must be one of {', '.join(PREPROCESSING_PROFILES)}, got {self.profile!r}")
        if self.pos_interpolation not in POS_INTERPOLATIONS:
            raise ValueError(f"pos_interpolation must be one of {', '.join(POS_INTERPOLATIONS)}, got "
                             f"{self.pos_interpolation!r}")
        if self.input_size is not None:
            object.__setattr__(self, "input_size", check_input_size(self.input_size))

    @property
    def patch_grid(self):
        """(rows, cols) of patch tokens, None when the input size is not known."""
        if self.input_size is None:
            return None
        return self.input_size[0] // PATCH_SIZE, self.input_size[1] // PATCH_SIZE

    @property
    def interpolates(self) -> bool:
        """True when the position embeddings are interpolated, so that pos_interpolation changes the tokens:
        every input but a square one with the 14x14 grid (transformers returns the embeddings unchanged then)."""
        if self.input_size is None:
            return True
        height, width = self.input_size
        return not (height == width and self.patch_grid == REFERENCE_GRID)

    def describe(self) -> str:
        """e.g. 'isaaclab at 120x160 (pos_interpolation scale_factor)', 'theia at 224x224'."""
        size = "the camera's resolution" if self.input_size is None else "x".join(map(str, self.input_size))
        text = f"{self.profile} at {size}"
        return text + (f" (pos_interpolation {self.pos_interpolation})" if self.interpolates else "")

    def mismatch(self, seen: "Preprocessing"):
        """None when features preprocessed as `seen` are what a policy trained on `self` (this) expects;
        otherwise why not, naming both. An input size not known on either side is not compared; the
        interpolation only where it changes the tokens."""
        same = (seen.profile == self.profile
                and (seen.input_size is None or self.input_size is None or seen.input_size == self.input_size)
                and (seen.pos_interpolation == self.pos_interpolation or not (seen.interpolates
                                                                                and self.interpolates)))
        if same:
            return None
        return (f"features preprocessed {seen.describe()}, but the policy was trained on features preprocessed "
                f"{self.describe()}")


def check_input_size(size) -> tuple:
    """(height, width) as two ints of at least one patch (16 pixels); ValueError otherwise."""
    try:
        height, width = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ValueError(f"input size must be two integers [height, width], got {size!r}") from None
    if height < PATCH_SIZE or width < PATCH_SIZE:
        raise ValueError(f"input size {height}x{width} is smaller than one {PATCH_SIZE}x{PATCH_SIZE} patch")
    return height, width


def preprocessing_of(msg) -> Preprocessing:
    """The :class:`Preprocessing` a Features message records; a message without those fields (or with
    them empty: written before they existed) records the reference, "theia" at 224x224.
    FeaturesFormatError for values that are none of the known ones."""
    profile = getattr(msg, "preprocessing", "") or DEFAULT_PREPROCESSING
    size = [int(v) for v in getattr(msg, "input_size", ())]
    if not size:
        size = REFERENCE_INPUT_SIZE if profile == DEFAULT_PREPROCESSING else None
    try:
        return Preprocessing(profile, size, getattr(msg, "pos_interpolation", "") or DEFAULT_POS_INTERPOLATION)
    except ValueError as exc:  # values no encoder of this package writes
        raise FeaturesFormatError(f"features message: {exc}") from None


def dtype_code(dtype):
    """Wire dtype code for a name ("float16"), a numpy dtype or a torch dtype."""
    name = str(dtype).replace("torch.", "")
    if name in DTYPE_CODES:
        return DTYPE_CODES[name]
    raise FeaturesFormatError(f"unsupported features dtype {dtype!r}; use one of {sorted(DTYPE_CODES)}")


def validate_layout(shape, dtype, nbytes):
    """Check that `nbytes` bytes hold a tensor of `shape` and wire `dtype`; return the element count."""
    if dtype not in _ITEMSIZE:
        raise FeaturesFormatError(f"unknown dtype code {dtype!r}; known: {DTYPE_NAMES}")
    shape = [int(s) for s in shape]
    if not shape:
        raise FeaturesFormatError("rank-0 features: shape is empty")
    if len(shape) > MAX_RANK:
        raise FeaturesFormatError(f"rank {len(shape)} exceeds the maximum of {MAX_RANK}")
    if any(s < 0 or s > _UINT32_MAX for s in shape):
        raise FeaturesFormatError(f"shape {shape} has a dimension outside 0..2^32-1")
    count = math.prod(shape)  # Python ints: no overflow, so a huge shape cannot wrap around
    expected = count * _ITEMSIZE[dtype]
    if expected != nbytes:
        raise FeaturesFormatError(
            f"data holds {nbytes} bytes but shape {shape} of {DTYPE_NAMES[dtype]} needs {expected}")
    return count


def encode_array(tensor, dtype=None):
    """Return (shape, dtype code, bytes-like) for a numpy array or torch tensor.

    `dtype` ("float32", "float16", "bfloat16") casts before packing; default: keep the tensor's own.
    The bytes-like object is an `array.array('B')`, which rosidl message fields take without a copy
    per element.
    """
    if hasattr(tensor, "detach"):  # torch.Tensor, without importing torch here
        tensor = tensor.detach()
        if dtype is not None:
            tensor = tensor.to(_torch_dtype(dtype_code(dtype)))
        code = dtype_code(tensor.dtype)
        tensor = tensor.cpu().contiguous()
        shape = list(tensor.shape)
        if code == DTYPE_BFLOAT16:
            import torch

            tensor = tensor.view(torch.int16)
        np_array = tensor.numpy()
    else:
        np_array = np.asarray(tensor)
        if dtype is not None:
            code = dtype_code(dtype)
            np_array = np_array.astype(_numpy_dtype(code), copy=False)
        code = dtype_code(_dtype_name(np_array.dtype))
        shape = list(np_array.shape)
    if not shape:
        raise FeaturesFormatError("cannot pack a rank-0 tensor: features need at least one dimension")
    if np_array.dtype.byteorder == ">" or (np_array.dtype.byteorder == "=" and sys.byteorder == "big"):
        np_array = np_array.byteswap().view(np_array.dtype.newbyteorder("<"))
    np_array = np.ascontiguousarray(np_array)
    data = array.array("B")
    data.frombytes(np_array.view(np.uint8).reshape(-1).data if np_array.size else b"")
    return shape, code, data


def decode_array(shape, dtype, data):
    """Read-only numpy view of `data` as a tensor of `shape` and wire `dtype` (no copy).

    bfloat16 needs ml_dtypes for numpy; `decode_torch` works without it.
    """
    buffer = memoryview(data).cast("B")
    validate_layout(shape, dtype, buffer.nbytes)
    np_dtype = _numpy_dtype(dtype)
    out = np.frombuffer(buffer, dtype=np_dtype).reshape([int(s) for s in shape])
    out.flags.writeable = False
    return out


def decode_torch(shape, dtype, data):
    """torch tensor sharing memory with `data` (no copy); bfloat16 comes out as torch.bfloat16."""
    import torch

    buffer = memoryview(data).cast("B")
    validate_layout(shape, dtype, buffer.nbytes)
    if buffer.nbytes == 0:
        return torch.empty([int(s) for s in shape], dtype=_torch_dtype(dtype))
    import warnings

    with warnings.catch_warnings():  # read-only buffers warn: callers must not write, as documented
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(buffer, dtype=_torch_dtype(dtype))
    return flat.view([int(s) for s in shape])


def to_features_msg(tensor, msg=None, *, header=None, camera="", model_id="", representation="tokens",
                    weights_id="", random_weights=False, dtype=None, preprocessing="", pos_interpolation="",
                    input_size=None, patch_grid=None):
    """Fill a `theia_ros/Features` message (a new one when `msg` is None) with `tensor` and metadata.

    `preprocessing`, `pos_interpolation`, `input_size` ([height, width] the model saw) and `patch_grid`
    (default: input_size // 16) say how the image became the model's input; left empty they mean the
    reference ("theia" at 224x224), as in messages from before those fields.
    """
    if msg is None:
        from theia_ros.msg import Features

        msg = Features()
    shape, code, data = encode_array(tensor, dtype)
    if header is not None:
        msg.header = header
    msg.camera = camera
    msg.model_id = model_id
    msg.representation = representation
    msg.weights_id = weights_id
    msg.random_weights = bool(random_weights)
    msg.preprocessing = preprocessing
    msg.pos_interpolation = pos_interpolation
    size = [] if input_size is None else [int(v) for v in input_size]
    if patch_grid is None:
        patch_grid = [v // PATCH_SIZE for v in size]
    msg.input_size = size
    msg.patch_grid = [int(v) for v in patch_grid]
    msg.shape = shape
    msg.dtype = code
    msg.data = data
    return msg


def features_to_numpy(msg):
    """Read-only numpy view of a Features message's tensor; FeaturesFormatError when inconsistent."""
    return decode_array(msg.shape, msg.dtype, msg.data)


def features_to_torch(msg):
    """torch view of a Features message's tensor (no copy); FeaturesFormatError when inconsistent."""
    return decode_torch(msg.shape, msg.dtype, msg.data)


def _dtype_name(np_dtype):
    if _NP_BFLOAT16 is not None and np_dtype == _NP_BFLOAT16:
        return "bfloat16"
    return np.dtype(np_dtype).newbyteorder("=").name


def _numpy_dtype(code):
    if code == DTYPE_BFLOAT16:
        if _NP_BFLOAT16 is None:
            raise FeaturesFormatError("bfloat16 features need the ml_dtypes package for numpy; "
                                      "use features_to_torch() instead")
        return _NP_BFLOAT16
    return _NP_DTYPES[code]


def _torch_dtype(code):
    import torch

    return {DTYPE_FLOAT32: torch.float32, DTYPE_FLOAT16: torch.float16, DTYPE_BFLOAT16: torch.bfloat16}[code]
