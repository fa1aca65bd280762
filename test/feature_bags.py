"""Bags of Features written by rosbags' Writer (another library's writer, not our recorder), and a small
train-policy run on them: shared by the tests of bags, preprocessing and policy checkpoints."""
import numpy as np
from rosbags.rosbag2 import StoragePlugin, Writer

from theia_ros.bags import io as bag_io
from theia_ros.cli.main import main
from theia_ros.features import encode_array


def header(store, t_ns, frame_id="front"):
    """A std_msgs/Header in `store`'s types at `t_ns`."""
    return store.types["std_msgs/msg/Header"](
        stamp=store.types["builtin_interfaces/msg/Time"](sec=t_ns // 10**9, nanosec=t_ns % 10**9), frame_id=frame_id)


def features_message(store, t_ns, array, camera="front", **new_fields):
    """A Features message in `store`'s definition (model "m", weights "w" unless `new_fields` say otherwise;
    fields today's definition has and `new_fields` leave out stay empty)."""
    shape, code, data = encode_array(np.asarray(array, np.float32))
    fields = dict(header=header(store, t_ns, camera), camera=camera, model_id="m", representation="tokens",
                  weights_id="w", random_weights=False, shape=np.asarray(shape, np.uint32), dtype=code,
                  data=np.frombuffer(data, np.uint8))
    cls = store.types[bag_io.FEATURES_TYPE]
    if "preprocessing" in cls.__dataclass_fields__:  # today's definition: the new fields empty unless given
        new_fields = {"preprocessing": "", "pos_interpolation": "", "input_size": [], "patch_grid": [], **new_fields}
    for name, value in new_fields.items():
        fields[name] = np.asarray(value, np.uint32) if name in ("input_size", "patch_grid") else value
    return cls(**fields)


def float64_command(store, values):
    """A std_msgs/Float64MultiArray holding `values`."""
    t = store.types
    return t["std_msgs/msg/Float64MultiArray"](layout=t["std_msgs/msg/MultiArrayLayout"](dim=[], data_offset=0),
                                               data=np.asarray(values, float))


def write_features_bag(path, store, n=24, storage="mcap", shape=(196, 4), image=False, **new_fields):
    """/front/features (in `store`'s definition of Features), /features/synchronized, /cmd commands at the
    frames' receive times, optionally a /cam/image_raw camera: 10 Hz; returns the expected arrays."""
    w = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3)
    w.open()
    cf = w.add_connection("/front/features", bag_io.FEATURES_TYPE, typestore=store)
    cm = w.add_connection("/features/synchronized", bag_io.MULTI_FEATURES_TYPE, typestore=store)
    cc = w.add_connection("/cmd", "std_msgs/msg/Float64MultiArray", typestore=store)
    ci = w.add_connection("/cam/image_raw", bag_io.IMAGE_TYPE, typestore=store) if image else None
    arrays = []
    for k in range(n):
        t = 10**9 + k * 10**8
        x = np.random.default_rng(k).standard_normal(shape).astype(np.float32)
        arrays.append(x)
        msg = features_message(store, t, x, **new_fields)
        w.write(cf, t, store.serialize_cdr(msg, bag_io.FEATURES_TYPE))
        multi = store.types[bag_io.MULTI_FEATURES_TYPE](header=msg.header, max_stamp_skew=0.0, cameras=[msg, msg])
        w.write(cm, t, store.serialize_cdr(multi, bag_io.MULTI_FEATURES_TYPE))
        w.write(cc, t, store.serialize_cdr(float64_command(store, [float(x.mean()), float(k)]),
                                           "std_msgs/msg/Float64MultiArray"))
        if ci is not None:
            rgb = np.random.default_rng(100 + k).integers(0, 256, (120, 160, 3), dtype=np.uint8)
            img = store.types[bag_io.IMAGE_TYPE](header=header(store, t, "cam"), height=120, width=160,
                                                 encoding="rgb8", is_bigendian=0, step=480, data=rgb.reshape(-1))
            w.write(ci, t, store.serialize_cdr(img, bag_io.IMAGE_TYPE))
    w.close()
    return arrays


def train_mlp(bag, out, capsys, *extra):
    """`theia-ros train-policy` of a small mlp on /front/features -> /cmd of `bag` (one or a list) into `out`;
    -> (exit code, captured output)."""
    args = ["train-policy", *map(str, bag if isinstance(bag, list) else [bag]), "--policy", "mlp", "--out", str(out),
            "--action-topic", "/cmd", "--features-topics", "/front/features", "--stamp", "receive", "--epochs", "1",
            "--batch-size", "4", "--param", "hidden_sizes=[8]", "--no-plot", "--threads", "1", *extra]
    code = main(args)
    return code, capsys.readouterr()
