"""encode-bags: a fleet's bags encoded on a local Ray with 2 workers, each output what encode-bag writes;
a worker killed mid-bag, a run started again, a changed option, and Ray missing."""
import json
import os
import shutil
import signal
import sys
import threading
import time

import numpy as np
import pytest
import torch
from test_bags import (
    RANDOM_TINY,
    T,
    frame,
    image_cdr,
    joint_cdr,
    make_camera_bag,
    open_writer,
    read_bag,
    ser,
)

from theia_ros.bags import io as bag_io
from theia_ros.bags.encode import encode_bag
from theia_ros.bags.fleet import (
    INSTALL_HINT,
    MANIFEST_NAME,
    PARTIAL_DIR,
    SUMMARY_NAME,
    FleetError,
    check_names,
    expand_inputs,
    read_manifest,
)
from theia_ros.cli.main import build_parser, main
from theia_ros.features import features_to_numpy

OPTIONS = dict(model=RANDOM_TINY, seed=3, backend="torch", device="cpu", batch=4)
ENCODE = ["--model", RANDOM_TINY, "--seed", "3", "--backend", "torch", "--device", "cpu", "--batch", "4",
          "--threads", "1"]
FLEET = [*ENCODE, "--workers", "2"]
GOOD = ("raw_sqlite", "jpeg_mcap", "slow")
SLOW_FRAMES = 64


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, logging_level="ERROR",
             object_store_memory=128 * 1024**2)
    yield ray
    ray.shutdown()


def _slow_bag(path):
    w = open_writer(path, "mcap")
    c = w.add_connection("/front/image_raw", bag_io.IMAGE_TYPE, typestore=bag_io.typestore())
    for i in range(SLOW_FRAMES):
        t = 10**9 + i * 66_000_000
        w.write(c, t, image_cdr(frame(i, 24, 32), t))
    w.close()


def _truncated_bag(path):
    w = open_writer(path, "sqlite3")
    c_img = w.add_connection("/front/image_raw", bag_io.IMAGE_TYPE, typestore=bag_io.typestore())
    c_big = w.add_connection("/blob", "std_msgs/msg/String", typestore=bag_io.typestore())
    for i in range(12):
        t = 10**9 + i * 10**8
        w.write(c_img, t, image_cdr(frame(i, 24, 32), t))
        w.write(c_big, t + 1, ser(T["String"](data="x" * 250_000), "std_msgs/msg/String"))
    w.close()
    data_file = next(p for p in path.iterdir() if p.suffix == ".db3")
    os.truncate(data_file, int(data_file.stat().st_size * 0.6))


def _no_camera_bag(path):
    w = open_writer(path, "mcap")
    c = w.add_connection("/joint_states", "sensor_msgs/msg/JointState", typestore=bag_io.typestore())
    for i in range(3):
        w.write(c, 10**9 + i, joint_cdr(10**9 + i, [i, i]))
    w.close()


@pytest.fixture(scope="module")
def bags(tmp_path_factory):
    """in/: two camera bags (raw rgb8 + jpeg, sqlite3 and MCAP), a longer one, a truncated one, one without a
    camera topic; ref/: what encode-bag writes for each (the truncated one: its valid partial output)."""
    root = tmp_path_factory.mktemp("fleet")
    src = root / "in"
    src.mkdir()
    make_camera_bag(src / "raw_sqlite", "sqlite3", n=4)
    make_camera_bag(src / "jpeg_mcap", "mcap", n=4)
    _slow_bag(src / "slow")
    _truncated_bag(src / "truncated")
    _no_camera_bag(src / "no_camera")
    threads = torch.get_num_threads()
    for name in (*GOOD, "truncated"):
        try:
            encode_bag(src / name, root / "ref" / name, threads=1, progress=False, **OPTIONS)
        except bag_io.BagReadError:
            assert name == "truncated"
    torch.set_num_threads(threads)
    return root


def _kill_worker_of(out, name, report):
    """Kill the worker process encoding `name` once its partial output holds features (mid-bag)."""
    work = out / PARTIAL_DIR / f"{name}.1"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        written = sum(p.stat().st_size for p in (work / name).glob("*.mcap")) if (work / name).is_dir() else 0
        if written > 1_000_000 and (work / "worker.json").exists():
            report["pid"] = json.loads((work / "worker.json").read_text())["pid"]
            report["mid_bag"] = not (out / name).exists()
            os.kill(report["pid"], signal.SIGKILL)
            return
        time.sleep(0.02)


def _summary(out):
    return {b["name"]: b for b in json.loads((out / SUMMARY_NAME).read_text())["bags"]}


def _same_output(got, ref):
    msgs_got, _, meta_got = read_bag(got)
    msgs_ref, _, meta_ref = read_bag(ref)
    assert msgs_got == msgs_ref  # every message byte for byte, with its timestamp
    topics = [{(t["topic_metadata"]["name"], t["topic_metadata"]["type"], t["message_count"])
               for t in meta["topics_with_message_count"]} for meta in (meta_got, meta_ref)]
    assert topics[0] == topics[1] and meta_got["message_count"] == meta_ref["message_count"]


@pytest.fixture(scope="module")
def first_run(local_ray, bags):
    out = bags / "out"
    killed = {}
    killer = threading.Thread(target=_kill_worker_of, args=(out, "slow", killed), daemon=True)
    killer.start()
    rc = main(["encode-bags", str(bags / "in"), "--out", str(out), *FLEET])
    killer.join(5)
    return rc, out, killed


def test_outputs_equal_encode_bags_a_killed_worker_is_retried_broken_bags_reported(bags, first_run, capsys):
    rc, out, killed = first_run
    assert rc == 1  # two inputs did not finish
    summary = _summary(out)
    assert {n: b["status"] for n, b in summary.items()} == {
        "raw_sqlite": "finished", "jpeg_mcap": "finished", "slow": "finished", "truncated": "incomplete",
        "no_camera": "failed"}
    for name in (*GOOD, "truncated"):  # the truncated input keeps encode-bag's valid partial output
        _same_output(out / name, bags / "ref" / name)
    assert "no camera topics" in summary["no_camera"]["error"]
    assert "corrupt or truncated" in summary["truncated"]["error"]
    assert str(out / "truncated") in summary["truncated"]["error"] and PARTIAL_DIR not in summary["truncated"]["error"]
    assert not (out / "no_camera").exists() and not (out / PARTIAL_DIR).exists()
    # the worker killed mid-bag: its bag redone by a live worker, the partial output of attempt 1 not taken
    assert killed.get("mid_bag") is True, killed
    assert summary["slow"]["attempts"] == 2 and summary["slow"]["frames"] == SLOW_FRAMES
    workers = json.loads((out / SUMMARY_NAME).read_text())["workers"]
    assert sum(w["deaths"] for w in workers) == 1 and sum(w["bags"] for w in workers) == 5
    assert all(0 < w["utilisation"] <= 1.01 for w in workers)
    manifest = read_manifest(out)
    assert manifest["slow"]["status"] == "finished" and manifest["slow"]["encoder"]["weights_id"].startswith("random:")
    assert manifest["slow"]["options"]["batch"] == 4 and manifest["slow"]["input"]["digest"].startswith("sha256:")


@pytest.fixture(scope="module")
def second_run(first_run, bags):
    """The run started again after a stop that left a partial output and lost jpeg_mcap's manifest line."""
    rc, out, _ = first_run
    lines = (out / MANIFEST_NAME).read_text().splitlines()
    (out / MANIFEST_NAME).write_text("".join(line + "\n" for line in lines if '"name": "jpeg_mcap"' not in line)
                                     + '{"name": "raw_sq')  # a line torn by the stop
    stale = out / PARTIAL_DIR / "slow.3" / "slow"
    stale.mkdir(parents=True)
    (stale / "slow_0.mcap").write_bytes(b"junk")
    mtimes = {n: (out / n / "metadata.yaml").stat().st_mtime_ns for n in GOOD}
    rc = main(["encode-bags", str(bags / "in" / "*"), "--out", str(out), *FLEET, "--no-progress"])
    return rc, out, mtimes


def test_a_second_run_redoes_only_unfinished_bags(bags, second_run):
    rc, out, mtimes = second_run
    assert rc == 1
    summary = _summary(out)
    assert {n: b["status"] for n, b in summary.items()} == {
        "raw_sqlite": "skipped", "jpeg_mcap": "finished", "slow": "skipped", "truncated": "incomplete",
        "no_camera": "failed"}
    assert summary["slow"]["attempts"] == 0 and summary["jpeg_mcap"]["attempts"] == 1
    for name in ("raw_sqlite", "slow"):
        assert (out / name / "metadata.yaml").stat().st_mtime_ns == mtimes[name]  # not rewritten
    assert (out / "jpeg_mcap" / "metadata.yaml").stat().st_mtime_ns != mtimes["jpeg_mcap"]
    _same_output(out / "jpeg_mcap", bags / "ref" / "jpeg_mcap")
    assert not (out / PARTIAL_DIR / "slow.3").exists()


def test_a_changed_encoder_option_redoes_every_bag(bags, second_run):
    _, out, _ = second_run
    manifest = bags / "two.txt"
    manifest.write_text("# the two small finished bags\nin/raw_sqlite\n\nin/jpeg_mcap\n")
    rc = main(["encode-bags", str(manifest), "--out", str(out), *ENCODE, "--workers", "1", "--dtype", "float16",
               "--no-progress"])
    assert rc == 0  # every input finished
    summary = _summary(out)
    assert {n: (b["status"], b["attempts"]) for n, b in summary.items()} == {
        "raw_sqlite": ("finished", 1), "jpeg_mcap": ("finished", 1)}
    msgs, _, _ = read_bag(out / "jpeg_mcap")
    first = bag_io.deserialize(msgs["/front/features"][0][1], bag_io.FEATURES_TYPE)
    assert features_to_numpy(first).dtype == np.float16
    assert read_manifest(out)["raw_sqlite"]["options"]["dtype"] == "float16"


def test_inputs_dirs_globs_manifests_duplicates_missing_and_collisions(tmp_path):
    for name in ("a", "b", "c"):
        (tmp_path / "bags" / name).mkdir(parents=True)
        (tmp_path / "bags" / name / "metadata.yaml").write_text("x")
    (tmp_path / "bags" / "notes.txt").write_text("not a bag")
    (tmp_path / "single.mcap").write_bytes(b"")
    (tmp_path / "list.txt").write_text("# fleet\n\nbags/a\n  bags/b  \nsingle.mcap\nmissing_bag\n")
    (tmp_path / "out" / "x").mkdir(parents=True)  # an output of an earlier run
    (tmp_path / "out" / "x" / "metadata.yaml").write_text("x")
    bags, errors, notes = expand_inputs([tmp_path / "list.txt", str(tmp_path / "bags" / "[bc]"),
                                         tmp_path / "bags", tmp_path / "nope", tmp_path / "out" / "x"],
                                        out=tmp_path / "out")
    assert [b.name for b in bags] == ["a", "b", "single", "c"]
    assert any("missing_bag" in e and "list.txt:6" in e for e in errors)
    assert any("nope" in e and "does not exist" in e for e in errors) and len(errors) == 2
    assert sum("more than once" in n for n in notes) == 4  # b from the glob, a, b and c from the directory
    assert any("inside the output directory" in n for n in notes)
    (tmp_path / "other" / "a").mkdir(parents=True)
    (tmp_path / "other" / "a" / "x.db3").write_bytes(b"")
    bags, errors, _ = expand_inputs([tmp_path / "bags" / "a", tmp_path / "other" / "a"])
    assert not errors
    with pytest.raises(FleetError, match="same name"):
        check_names(bags, tmp_path / "out")
    with pytest.raises(FleetError, match="input itself"):
        check_names(bags[:1], tmp_path / "bags")


def test_encode_bags_takes_encode_bags_options():
    parser = build_parser()
    common = [*ENCODE, "--cameras", "/front/image_raw", "--no-copy", "--storage", "sqlite3", "--bag-version", "8",
              "--dtype", "float16", "--input-size", "160", "160", "--preprocessing", "isaaclab", "--overwrite"]
    one = vars(parser.parse_args(["encode-bag", "IN", "OUT", *common]))
    many = vars(parser.parse_args(["encode-bags", "IN", "--out", "OUT", *common]))
    shared = set(one) - {"input", "output", "func", "command"}
    assert shared <= set(many) and {k: one[k] for k in shared} == {k: many[k] for k in shared}


def test_without_ray_encode_bags_names_the_extra_and_encode_bag_still_works(bags, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError, as where it is not installed
    bag = bags / "in" / "raw_sqlite"
    assert main(["encode-bags", str(bag), "--out", str(tmp_path / "o"), *ENCODE]) == 1
    err = capsys.readouterr().err
    assert INSTALL_HINT in err and "theia_ros[fleet]" in err and not (tmp_path / "o").exists()
    assert main(["encode-bag", str(bag), str(tmp_path / "one"), *ENCODE, "--no-progress"]) == 0
    _same_output(tmp_path / "one", bags / "ref" / "raw_sqlite")
    shutil.rmtree(tmp_path / "one")
