"""Distillation / fine-tuning (theia_ros.distill, `theia-ros distill`): teachers, sources, cache, training.

Everything runs offline on CPU: teachers are tiny random models built from small configs (same
feature grids as the real ones, fewer channels), the student is theia-tiny, the images are ~64
synthetic PNGs plus a small rosbag. Expensive runs are module fixtures shared by several tests.
"""
import json
import socket

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conformance_weights import write_checkpoint
from rosbags.rosbag2 import StoragePlugin, Writer

from theia_ros.bags import io as bag_io
from theia_ros.cli.main import main
from theia_ros.distill import DistillConfig, distill
from theia_ros.distill.cache import FeatureCache
from theia_ros.distill.sources import BagSource, FolderSource, build_index, dataset_id, split_items
from theia_ros.distill.student import STATS_FILE, distill_loss, load_feature_stats
from theia_ros.distill.teachers import TEACHERS, build_teacher
from theia_ros.distill.train import StreamSampler, lr_factor
from theia_ros.encoder.checkpoint import checkpoint_key_order
from theia_ros.encoder.config import TEACHER_FEATURE_SIZES
from theia_ros.encoder.model import load_model
from theia_ros.weights import read_safetensors_header

TEACHER_NAMES = ["clip", "dinov2"]
STEPS = 12  # the straight run; the interrupted one stops at STEPS // 2 and resumes
CONFORMANCE_TINY = "theia-tiny-patch16-224-cddsv"


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


# ---------------------------------------------------------------------------------------------
# data: synthetic images (gradients and discs) and a rosbag with a raw and a jpeg camera


def synthetic_image(rng, h, w):
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    img = (c0 * (1 - xx[..., None]) + c1 * yy[..., None]).clip(0, 255).astype(np.uint8)
    for _ in range(3):
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        cv2.circle(img, centre, int(rng.integers(5, 30)), tuple(int(v) for v in rng.integers(0, 256, 3)), -1)
    return img


def write_bag(path, rng, n=8):
    store = bag_io.typestore()
    names = ("builtin_interfaces/msg/Time", "std_msgs/msg/Header", bag_io.IMAGE_TYPE, bag_io.COMPRESSED_IMAGE_TYPE)
    T = {k.rsplit("/", 1)[-1]: v for k, v in store.types.items() if k in names}
    w = Writer(path, version=9, storage_plugin=StoragePlugin.MCAP)
    w.open()
    raw = w.add_connection("/front/image_raw", bag_io.IMAGE_TYPE, typestore=store)
    jpg = w.add_connection("/wrist/image_raw/compressed", bag_io.COMPRESSED_IMAGE_TYPE, typestore=store)
    other = w.add_connection("/note", "std_msgs/msg/String", typestore=store)
    frames = []
    for i in range(n):
        t = 1_000_000_000 + i * 4_000_000_000  # 4 s apart: 10 s split blocks hold 2-3 frames
        header = T["Header"](stamp=T["Time"](sec=t // 10**9, nanosec=t % 10**9), frame_id="cam")
        rgb = synthetic_image(rng, 48, 64)
        msg = T["Image"](header=header, height=48, width=64, encoding="rgb8", is_bigendian=0, step=64 * 3,
                         data=rgb.reshape(-1))
        w.write(raw, t, bytes(store.serialize_cdr(msg, bag_io.IMAGE_TYPE)))
        frames.append(rgb)
        if i % 2 == 0:
            ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(synthetic_image(rng, 60, 80)[..., ::-1]))
            msg = T["CompressedImage"](header=header, format="jpeg", data=buf.reshape(-1))
            w.write(jpg, t + 1000, bytes(store.serialize_cdr(msg, bag_io.COMPRESSED_IMAGE_TYPE)))
        w.write(other, t + 5, bytes(store.serialize_cdr(store.types["std_msgs/msg/String"](data=f"n{i}"),
                                                         "std_msgs/msg/String")))
    w.close()
    return frames


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    images = root / "images"
    (images / "sub").mkdir(parents=True)
    for i in range(64):
        h, w = (int(v) for v in rng.integers(64, 129, 2))
        folder = images / "sub" if i % 8 == 0 else images
        suffix = ".jpg" if i % 16 == 5 else ".png"
        cv2.imwrite(str(folder / f"im{i:03d}{suffix}"), synthetic_image(rng, h, w)[..., ::-1])
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")  # undecodable: left out
    (images / "notes.txt").write_text("not an image")
    bag_frames = write_bag(root / "bag", rng)
    return {"root": root, "images": images, "bag": root / "bag", "cache": root / "cache", "bag_frames": bag_frames}


def config(data, out, **overrides):
    base = dict(out=str(out), images=[str(data["images"])], bags=[str(data["bag"])], teachers=TEACHER_NAMES,
                teacher_mode="small", from_scratch="theia-tiny-patch16-224-cdiv", steps=STEPS, batch=2, lr=1e-3,
                shard_size=16, holdout=0.125, cache=str(data["cache"]), log_every=4, save_every=STEPS // 2,
                keep_checkpoints=3, seed=0, eval_images=8)
    base.update(overrides)
    return DistillConfig(**base)


@pytest.fixture(scope="module")
def straight(data):
    """STEPS steps from scratch in one go (it also fills the feature cache)."""
    logs = []
    result = distill(config(data, data["root"] / "run_straight"), log_fn=logs.append)
    return result, logs


# ---------------------------------------------------------------------------------------------
# teachers, sources, loss, schedule (cheap)


def test_teacher_specs_and_small_teachers():
    assert {s.model_id: s.target for s in TEACHERS.values()} == TEACHER_FEATURE_SIZES
    images = torch.from_numpy(np.stack([synthetic_image(np.random.default_rng(i), 224, 224) for i in range(2)]))
    for name, spec in TEACHERS.items():
        teacher = build_teacher(name, "small", seed=0)
        fmap = teacher(images)
        assert tuple(fmap.shape) == (2,) + spec.small_target, name
        assert spec.small_target[1:] == spec.target[1:], name  # same grid as the real teacher
        assert torch.isfinite(fmap).all() and fmap.std() > 1e-3, name
        assert not torch.allclose(fmap[0], fmap[1]), name  # depends on the image
        again = build_teacher(name, "small", seed=0)(images)  # deterministic random weights
        assert torch.equal(fmap, again), name
        assert teacher.calls == 1


def test_sources_index_and_split(data):
    sources = [FolderSource(data["images"]), BagSource(data["bag"])]
    items = build_index(sources)
    files = [it for it in items if it.key.startswith("img:")]
    frames = [it for it in items if it.key.startswith("bag:")]
    assert len(files) == 65  # 64 images + the broken png; notes.txt is not an image
    assert len(frames) == 8 + 4  # raw camera + jpeg camera
    assert len({it.key for it in items}) == len(items)
    assert build_index([FolderSource(data["images"]), BagSource(data["bag"])]) == items
    train, held = split_items(items, 0.125, seed=0)
    assert sorted(train + held) == list(range(len(items))) and not set(train) & set(held)
    assert 0 < len(held) < len(items) // 3
    assert split_items(items, 0.125, seed=0) == (train, held)
    assert split_items(items, 0.125, seed=1) != (train, held)
    # frames of one time block (both cameras) fall on the same side
    side = {}
    for i in train + held:
        if items[i].key.startswith("bag:"):
            side.setdefault(items[i].group, set()).add(i in held)
    assert all(len(v) == 1 for v in side.values()) and len(side) < 12
    # a topic subset and a stride
    sub = BagSource(data["bag"], topics=["/front/image_raw"], stride=2).items(0)
    assert [it.ref for it in sub] == [("/front/image_raw", n) for n in (0, 2, 4, 6)]
    decoded = dict(BagSource(data["bag"], topics=["/front/image_raw"]).load(sub))
    assert decoded[sub[1]].shape == (224, 224, 3)
    from theia_ros.distill.sources import resize_uint8
    assert np.array_equal(decoded[sub[1]], resize_uint8(data["bag_frames"][2]))
    with pytest.raises(ValueError, match="no camera topic"):
        BagSource(data["bag"], topics=["/nope"]).items(0)


def test_loss_is_theia_loss():
    torch.manual_seed(0)
    preds = [torch.randn(3, 256, 8), torch.randn(3, 16, 4)]
    tgts = [torch.randn(3, 256, 8), torch.randn(3, 16, 4)]
    total, parts = distill_loss(preds, tgts)
    expect = []
    for p, t in zip(preds, tgts):
        cos = torch.nn.CosineEmbeddingLoss()(F.normalize(p.flatten(1)), F.normalize(t.flatten(1)), torch.ones(3))
        expect.append(0.9 * cos + 0.1 * torch.nn.SmoothL1Loss()(p, t))
    assert torch.allclose(total, torch.stack(expect).mean(), atol=1e-6)
    assert torch.allclose(parts[0][0], expect[0], atol=1e-6)
    zero, _ = distill_loss(tgts, tgts)
    assert float(zero) < 1e-6


def test_schedule_and_sampler():
    assert lr_factor(0, 10) == pytest.approx(0.01)
    assert lr_factor(5, 10) == pytest.approx(0.01 + 0.99 * 0.5)
    assert lr_factor(10, 10) == lr_factor(500, 10) == 1.0
    assert lr_factor(0, 0) == 1.0
    s = StreamSampler(list(range(10, 17)), global_batch=4, seed=3)
    stream = [i for step in range(7) for i in s.global_batch_at(step)]  # 4 epochs of 7
    for e in range(4):
        assert sorted(stream[7 * e:7 * e + 7]) == list(range(10, 17))
    assert StreamSampler(list(range(10, 17)), 4, seed=3).global_batch_at(5) == s.global_batch_at(5)
    assert s.rank_batch(2, 0, 2) + s.rank_batch(2, 1, 2) == s.global_batch_at(2)


# ---------------------------------------------------------------------------------------------
# training


def test_losses_fall_and_held_out_cosine_rises(straight, data):
    result, logs = straight
    losses = [h["loss"] for h in result.history]
    assert len(losses) == STEPS and result.step == STEPS
    half = STEPS // 2
    first, last = np.mean(losses[:half]), np.mean(losses[half:])
    assert last < 0.75 * first, losses
    for t in result.stats:
        per = [h[f"loss/{t}"] for h in result.history]
        assert np.mean(per[half:]) < np.mean(per[:half]), t
    assert result.held_out_images > 0 and result.train_images > 0
    assert result.train_images + result.held_out_images == 64 + 12  # the broken png is left out
    start, end = result.evals[0], result.evals[-1]
    assert start["step"] == 0 and end["step"] == STEPS
    for t in result.stats:
        assert end[f"cos/{t}"] > start[f"cos/{t}"] + 0.2, (start, end)
    # logs, plot, progress
    out = result.out
    assert (out / "losses.png").stat().st_size > 1000
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))
    assert any("img/s" in m and "ETA" in m for m in logs)
    # the learning rate warmed up linearly over 10% of the steps, then stayed constant
    lrs = [h["lr"] for h in result.history]
    warm = round(0.1 * STEPS)
    assert lrs[0] == pytest.approx(1e-3 * 0.01) and lrs[warm:] == [pytest.approx(1e-3)] * (STEPS - warm)
    summary = json.loads((out / "distill_summary.json").read_text())
    assert summary["step"] == STEPS and summary["images_per_s"] > 0


def test_written_checkpoint_reloads_with_training_outputs(straight, data):
    result, _ = straight
    out = result.out
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["backbone"] == "facebook/deit-tiny-patch16-224"
    assert cfg["target_feature_sizes"] == {TEACHERS[n].model_id: list(TEACHERS[n].small_target) for n in TEACHER_NAMES}
    header = read_safetensors_header(out / "model.safetensors")
    model = load_model(out)
    assert set(header) == set(checkpoint_key_order(model.config))  # published key names
    assert all(dt == "F32" for dt, _ in header.values())
    # the reloaded model gives what the trained one gave
    images = np.stack([synthetic_image(np.random.default_rng(100 + i), 96, 128) for i in range(2)])
    trained = result.model
    with torch.no_grad():
        for t in cfg["target_feature_sizes"]:
            assert torch.equal(model.forward(images, teachers=[t])[t], trained.forward(images, teachers=[t])[t])
        assert torch.equal(model.forward_feature(images), trained.forward_feature(images))
    # the target statistics travel with the student
    stats = load_feature_stats(out)
    assert set(stats) == set(cfg["target_feature_sizes"])
    for t, (mean, std) in stats.items():
        assert mean.shape == std.shape == (cfg["target_feature_sizes"][t][0],) and (std > 0).all()
        assert torch.equal(mean, result.stats[t][0])


def test_resume_continues_the_same_loss_curve_and_reuses_the_cache(straight, data):
    """STEPS // 2 steps, stop, resume (model, optimizer, scheduler, step, RNG from the checkpoint),
    STEPS // 2 more: the same loss curve as the straight run. Both runs reuse the feature cache."""
    a, _ = straight
    out = data["root"] / "run_resumed"
    b = distill(config(data, out, stop_after=STEPS // 2, evaluate=False), log_fn=lambda m: None)
    assert b.step == STEPS // 2 and b.steps == STEPS
    assert b.teacher_forward_calls == {TEACHERS[n].model_id: 0 for n in TEACHER_NAMES}  # every shard reused
    assert (out / "checkpoints" / f"step-{STEPS // 2:08d}.pt").is_file()
    with pytest.raises(FileExistsError):  # an earlier run's checkpoints are not silently replaced
        distill(config(data, out), log_fn=lambda m: None)
    with pytest.raises(ValueError, match="other settings"):  # nor continued with other settings
        distill(config(data, out, resume="latest", lr=2e-3), log_fn=lambda m: None)
    c = distill(config(data, out, resume="latest", evaluate=False), log_fn=lambda m: None)
    assert c.teacher_forward_calls == {TEACHERS[n].model_id: 0 for n in TEACHER_NAMES}
    assert c.step == STEPS and [h["step"] for h in c.history] == list(range(1, STEPS + 1))
    straight_losses = np.array([h["loss"] for h in a.history])
    resumed_losses = np.array([h["loss"] for h in c.history])
    np.testing.assert_allclose(resumed_losses, straight_losses, rtol=1e-5, atol=1e-6)
    for (k, v1), v2 in zip(a.model.state_dict().items(), c.model.state_dict().values()):
        torch.testing.assert_close(v2, v1, rtol=1e-4, atol=1e-5, msg=k)
    lines = (out / "train_log.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == list(range(1, STEPS + 1))


def test_feature_cache_recomputes_only_missing_shards(straight, data):
    result, _ = straight
    cache_dir = result.cache_dir
    clip_dir = next((cache_dir / "teachers").glob("openai_clip*"))
    shards = sorted(clip_dir.glob("shard-*.safetensors"))
    assert len(shards) == 5  # 77 images in shards of 16
    shards[1].unlink()  # lost
    shards[3].write_bytes(shards[3].read_bytes()[:1000])  # truncated by a crash
    again = distill(config(data, data["root"] / "extract", extract_only=True), log_fn=lambda m: None)
    clip, dino = TEACHERS["clip"].model_id, TEACHERS["dinov2"].model_id
    assert again.teacher_images == {clip: 32, dino: 0}
    assert again.teacher_forward_calls[dino] == 0
    assert len(list(clip_dir.glob("shard-*.safetensors"))) == 5
    assert not list(clip_dir.glob(".*tmp*"))


def test_cache_layout_and_undecodable_images(straight, data):
    result, _ = straight
    sources = [FolderSource(data["images"]), BagSource(data["bag"])]
    items = build_index(sources)
    cache = FeatureCache(data["cache"], sources, items, dataset_id(sources, items), shard_size=16)
    assert cache.dir == result.cache_dir
    assert cache.missing_image_shards() == []
    broken = [i for i, it in enumerate(items) if it.key.endswith("broken.png")]
    assert not cache.valid[broken].any() and cache.valid.sum() == len(items) - 1
    index = json.loads((cache.dir / "index.json").read_text())
    assert index["keys"] == [it.key for it in items]


def test_cli_fine_tune_with_lr_zero_keeps_patch_tokens(straight, data, tmp_path):
    init = tmp_path / "init"
    write_checkpoint(CONFORMANCE_TINY, init, seed=1)
    out = tmp_path / "ft"
    rc = main(["distill", "--images", str(data["images"]), "--bags", str(data["bag"]), "--teachers", *TEACHER_NAMES,
               "--small-teachers", "--init", str(init), "--out", str(out), "--steps", "2", "--batch", "2",
               "--lr", "0", "--shard-size", "16", "--holdout", "0.125", "--cache", str(data["cache"]),
               "--log-every", "1", "--no-eval"])
    assert rc == 0
    before, after = load_model(init), load_model(out)
    images = np.stack([synthetic_image(np.random.default_rng(7), 224, 224)])
    assert torch.equal(after.forward_feature(images), before.forward_feature(images))
    assert torch.equal(after.forward_feature(images, "cls"), before.forward_feature(images, "cls"))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["theia_ros_distill"]["init"] == str(init)
    assert (out / STATS_FILE).is_file() and (out / "losses.png").is_file()


def test_ddp_code_path_world_size_one(straight, data, monkeypatch):
    """The torch.distributed / DDP path (gloo, one process) trains exactly like the plain one."""
    a, _ = straight
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                 "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(k, v)
    out = data["root"] / "run_ddp"
    r = distill(config(data, out, ddp=True, stop_after=2, evaluate=False), log_fn=lambda m: None)
    assert not torch.distributed.is_initialized()  # the run cleans up the process group it made
    assert r.step == 2 and r.steps == STEPS  # stopped early, with a checkpoint and a usable model
    assert (out / "checkpoints" / "step-00000002.pt").is_file()
    assert json.loads((out / "config.json").read_text())["theia_ros_distill"]["step"] == 2
    np.testing.assert_allclose([h["loss"] for h in r.history], [h["loss"] for h in a.history[:2]],
                               rtol=1e-5, atol=1e-6)


def test_pretrained_teachers_load_safetensors_snapshots(tmp_path):
    """The "pretrained" path (from_pretrained, safetensors only, SAM's vision encoder kept) on local
    snapshots of small models, since the hub is out of reach here."""
    import dataclasses

    from transformers import CLIPVisionConfig, CLIPVisionModel, SamConfig, SamModel, SamVisionConfig

    x = torch.from_numpy(np.stack([synthetic_image(np.random.default_rng(3), 224, 224)]))
    clip = TEACHERS["clip"]
    torch.manual_seed(0)
    reference = CLIPVisionModel(CLIPVisionConfig(**clip.small_config)).eval()
    reference.save_pretrained(tmp_path / "clip", safe_serialization=True)
    assert (tmp_path / "clip" / "model.safetensors").is_file()
    spec = dataclasses.replace(clip, model_id=str(tmp_path / "clip"), preprocess=clip.small_preprocess,
                               target=clip.small_target)
    teacher = build_teacher(spec, "pretrained")
    with torch.no_grad():
        tokens = reference(pixel_values=clip.small_preprocess(x)).last_hidden_state[:, 1:]
    assert torch.allclose(teacher(x), tokens.transpose(1, 2).unflatten(2, (16, 16)), atol=1e-5)

    sam = TEACHERS["sam"]
    torch.manual_seed(0)
    reference = SamModel(SamConfig(vision_config=SamVisionConfig(**sam.small_config).to_dict())).eval()
    reference.save_pretrained(tmp_path / "sam", safe_serialization=True)
    spec = dataclasses.replace(sam, model_id=str(tmp_path / "sam"), preprocess=sam.small_preprocess,
                               target=sam.small_target)
    teacher = build_teacher(spec, "pretrained")
    assert type(teacher.model).__name__ == "SamVisionEncoder"
    with torch.no_grad():
        expect = reference.get_image_embeddings(sam.small_preprocess(x))
    assert torch.allclose(teacher(x), expect, atol=1e-5)
