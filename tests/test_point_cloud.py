"""Point-cloud completion: geometry against brute force, PCD files, PCN data, metrics, training."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from attention_zoo import AttentionConfigError, MultiHeadAttention, Pattern, list_attentions
from runners.execute import execute
from tasks.base import AttentionChoice, DatasetUnavailable
from tasks.point_cloud import geometry
from tasks.point_cloud.data import (
    PCN_CATEGORIES,
    PCN_INDEX,
    REAL_SCANS,
    SYNTHETIC_SAMPLE,
    PCNDataset,
    fetch_pcn,
    list_items,
    read_index,
    resample,
)
from tasks.point_cloud.geometry import chamfer_l1, chamfer_l2, f_score, farthest_point_sample, knn
from tasks.point_cloud.metrics import summarize
from tasks.point_cloud.model import PoinTr, PoinTrSettings
from tasks.point_cloud.pcd import PCDError, read_pcd, read_pcd_header, write_pcd
from tasks.point_cloud.task import PointCloudCompletion
from tasks.registry import get_task

pytestmark = pytest.mark.task


@pytest.fixture(autouse=True)
def _one_thread():
    # These models are small: on a shared 2-core machine a second thread only adds contention.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- brute-force references: plain Python over every pair, in float64 ------------------------


def brute_squared(a: np.ndarray, b: np.ndarray) -> list[list[float]]:
    return [[sum((float(p) - float(q)) ** 2 for p, q in zip(x, y)) for y in b] for x in a]


def brute_chamfer(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    pairs = brute_squared(x, y)
    x_to_y = [min(row) for row in pairs]
    y_to_x = [min(pairs[i][j] for i in range(len(x))) for j in range(len(y))]
    l2 = sum(x_to_y) / len(x) + sum(y_to_x) / len(y)
    l1 = (sum(map(math.sqrt, x_to_y)) / len(x) + sum(map(math.sqrt, y_to_x)) / len(y)) / 2
    return l1, l2


def brute_fps(points: np.ndarray, count: int) -> list[int]:
    chosen = [0]
    while len(chosen) < count:
        gaps = [min(sum((points[i] - points[c]) ** 2) for c in chosen) for i in range(len(points))]
        chosen.append(max(range(len(points)), key=lambda i: (gaps[i], -i)))
    return chosen


def clouds(*sizes: int, batch: int = 2, dtype=torch.float64) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(sum(sizes))
    return [torch.rand(batch, n, 3, generator=generator, dtype=dtype) - 0.5 for n in sizes]


# --- geometry ----------------------------------------------------------------------------------


@pytest.mark.parametrize("metric", [chamfer_l1, chamfer_l2])
def test_chamfer_of_a_cloud_with_itself_is_zero(metric):
    (x,) = clouds(300)
    assert torch.equal(metric(x, x, backend="torch"), torch.zeros(2, dtype=x.dtype))
    shuffled = x[:, torch.randperm(300)]
    assert torch.equal(metric(x, shuffled, backend="torch"), torch.zeros(2, dtype=x.dtype))


@pytest.mark.parametrize("metric", [chamfer_l1, chamfer_l2])
def test_chamfer_is_symmetric(metric):
    x, y = clouds(120, 77)
    assert torch.equal(metric(x, y, backend="torch"), metric(y, x, backend="torch"))


def test_chamfer_equals_brute_force():
    x, y = clouds(40, 57)
    l1, l2 = chamfer_l1(x, y, backend="torch"), chamfer_l2(x, y, backend="torch")
    for b in range(2):
        want_l1, want_l2 = brute_chamfer(x[b].numpy(), y[b].numpy())
        assert l1[b].item() == pytest.approx(want_l1, rel=1e-12)
        assert l2[b].item() == pytest.approx(want_l2, rel=1e-12)


def test_chamfer_gradients_equal_those_of_the_all_pairs_formula():
    x, y = (c.requires_grad_() for c in clouds(50, 70))
    x_ref, y_ref = (c.detach().clone().requires_grad_() for c in (x, y))
    (chamfer_l1(x, y, backend="torch").sum() + chamfer_l2(x, y, backend="torch").sum()).backward()
    squared = ((x_ref.unsqueeze(2) - y_ref.unsqueeze(1)) ** 2).sum(-1)  # [B, N, M]
    x_to_y, y_to_x = squared.min(2).values, squared.min(1).values
    reference = (x_to_y.sqrt().mean(1) + y_to_x.sqrt().mean(1)) / 2 + x_to_y.mean(1) + y_to_x.mean(1)
    reference.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y.grad, y_ref.grad, rtol=1e-10, atol=1e-12)


def test_chamfer_l1_gradient_is_finite_where_points_coincide():
    (x,) = clouds(30)
    prediction = x.clone().requires_grad_()
    chamfer_l1(prediction, x, backend="torch").sum().backward()
    assert torch.isfinite(prediction.grad).all()


@pytest.mark.parametrize("max_elements", [1, 100, geometry.DEFAULT_MAX_ELEMENTS])
def test_knn_equals_brute_force_in_any_chunking(max_elements):
    query, points = clouds(23, 41)
    distances, index = knn(query, points, 5, backend="torch", max_elements=max_elements)
    for b in range(2):
        pairs = np.array(brute_squared(query[b].numpy(), points[b].numpy()))
        order = np.argsort(pairs, axis=1, kind="stable")[:, :5]
        assert index[b].tolist() == order.tolist()
        np.testing.assert_allclose(distances[b].numpy(), np.take_along_axis(pairs, order, 1), rtol=1e-12)


def test_fps_equals_brute_force():
    (points,) = clouds(60, dtype=torch.float32)
    index = farthest_point_sample(points, 12, backend="torch")
    for b in range(2):
        assert index[b].tolist() == brute_fps(points[b].double().numpy(), 12)


def test_fps_and_knn_refuse_bad_sizes():
    (points,) = clouds(10)
    with pytest.raises(ValueError, match=r"num_samples=11 must be in \[1, 10\]"):
        farthest_point_sample(points, 11)
    with pytest.raises(ValueError, match=r"k=11 must be in \[1, 10\]"):
        knn(points, points, 11)
    with pytest.raises(ValueError, match=r"shape \[B, N, 3\]"):
        knn(points[..., :2], points, 1)


def test_backend_is_chosen_automatically_and_checked():
    expected = "pytorch3d" if geometry.pytorch3d_available() else "torch"
    assert geometry.resolve_backend("auto") == expected
    with pytest.raises(ValueError, match="unknown geometry backend 'cuda'; valid: auto, torch, pytorch3d"):
        geometry.resolve_backend("cuda")
    if not geometry.pytorch3d_available():
        with pytest.raises(ValueError, match="no Linux wheel on PyPI"):
            geometry.resolve_backend("pytorch3d")


def test_pytorch3d_and_torch_give_the_same_numbers():
    pytest.importorskip("pytorch3d.ops")
    x, y = clouds(200, 333, dtype=torch.float32)
    for metric in (chamfer_l1, chamfer_l2):
        torch.testing.assert_close(metric(x, y, backend="pytorch3d"), metric(x, y, backend="torch"))
    assert torch.equal(farthest_point_sample(x, 16, backend="pytorch3d"),
                       farthest_point_sample(x, 16, backend="torch"))
    d3, i3 = knn(x, y, 4, backend="pytorch3d")
    dt, it = knn(x, y, 4, backend="torch")
    assert torch.equal(i3, it)
    torch.testing.assert_close(d3, dt)


def test_f_score_of_identical_clouds_is_one_and_a_hand_computed_case():
    (x,) = clouds(100)
    assert torch.equal(f_score(x, x), torch.ones(2, dtype=x.dtype))
    truth = torch.tensor([[[0.0, 0, 0], [1, 0, 0]]])
    prediction = torch.tensor([[[0.0, 0, 0], [0.005, 0, 0], [0.5, 0, 0]]])
    # precision 2/3 (two predictions within 0.01), recall 1/2: F = 2 (1/3) / (7/6) = 4/7
    assert f_score(prediction, truth, 0.01).item() == pytest.approx(4 / 7)
    assert f_score(prediction + 5, truth, 0.01).item() == 0.0
    with pytest.raises(ValueError, match="threshold must be > 0"):
        f_score(x, x, 0.0)


def test_metrics_average_per_category_then_over_categories():
    rows = [("a", {"cd_l1": 1.0, "cd_l2": 2.0, "f_score": 0.5}),
            ("a", {"cd_l1": 3.0, "cd_l2": 4.0, "f_score": 0.7}),
            ("b", {"cd_l1": 10.0, "cd_l2": 20.0, "f_score": 0.0})]
    overall, per_category = summarize(rows)
    assert per_category["a"] == {"cd_l1": 2.0, "cd_l2": 3.0, "f_score": pytest.approx(0.6), "samples": 2.0}
    assert overall == {"cd_l1": 6.0, "cd_l2": 11.5, "f_score": pytest.approx(0.3)}


# --- PCD files ---------------------------------------------------------------------------------


@pytest.mark.parametrize("binary", [True, False])
def test_pcd_round_trip_is_exact(tmp_path, binary):
    points = (np.random.default_rng(0).normal(size=(257, 3)) * [1, 1e-4, 1e5]).astype(np.float32)
    write_pcd(tmp_path / "cloud.pcd", points, binary=binary)
    assert read_pcd_header(tmp_path / "cloud.pcd").data == ("binary" if binary else "ascii")
    np.testing.assert_array_equal(read_pcd(tmp_path / "cloud.pcd"), points)


@pytest.mark.parametrize(("name", "count"), [("airplane", 796), ("sofa", 1100)])
def test_the_real_scans_read_and_survive_a_binary_round_trip(tmp_path, name, count):
    path = REAL_SCANS[name]
    header = read_pcd_header(path)
    assert (header.fields, header.data, header.points) == (("x", "y", "z"), "ascii", count)
    points = read_pcd(path)
    assert points.shape == (count, 3) and np.isfinite(points).all()
    assert np.abs(points).max() < 0.5  # PCN's unit-cube frame
    first = path.read_text().splitlines()[11].split()  # the first data row, as written
    np.testing.assert_array_equal(points[0], np.array(first, dtype=np.float32))
    write_pcd(tmp_path / "copy.pcd", points, binary=True)
    np.testing.assert_array_equal(read_pcd(tmp_path / "copy.pcd"), points)


def test_pcd_reads_mixed_binary_fields_and_refuses_what_it_cannot(tmp_path):
    records = np.zeros(3, dtype=[("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("label", "u1"), ("t", "<f8")])
    records["x"], records["z"], records["label"], records["t"] = [1, 2, 3], [7, 8, 9], [4, 5, 6], [0.5, 1, 2]
    header = ("VERSION 0.7\nFIELDS x y z label t\nSIZE 4 4 4 1 8\nTYPE F F F U F\nCOUNT 1 1 1 1 1\n"
              "WIDTH 3\nHEIGHT 1\nPOINTS 3\nDATA binary\n")
    (tmp_path / "mixed.pcd").write_bytes(header.encode() + records.tobytes())
    np.testing.assert_array_equal(read_pcd(tmp_path / "mixed.pcd", ("z", "label", "t")),
                                  [[7, 4, 0.5], [8, 5, 1], [9, 6, 2]])
    with pytest.raises(PCDError, match="no field rgb; the file has x, y, z, label, t"):
        read_pcd(tmp_path / "mixed.pcd", ("rgb",))
    (tmp_path / "short.pcd").write_bytes(header.encode() + records.tobytes()[:-4])
    with pytest.raises(PCDError, match="need 63 bytes"):
        read_pcd(tmp_path / "short.pcd")
    (tmp_path / "lzf.pcd").write_bytes(header.replace("binary", "binary_compressed").encode())
    with pytest.raises(PCDError, match="'binary_compressed' is not supported; valid: ascii, binary"):
        read_pcd(tmp_path / "lzf.pcd")


# --- PCN data ----------------------------------------------------------------------------------


def test_the_shipped_indexes_are_pcn():
    index = read_index(PCN_INDEX.parent)
    assert [e["taxonomy_name"] for e in index] == PCN_CATEGORIES.read_text().split()
    assert [len(e["test"]) for e in index] == [150] * 8
    assert sum(len(e["train"]) for e in index) == 28974  # PCN's 28,974 training models
    synthetic = read_index(SYNTHETIC_SAMPLE)
    assert [(e["taxonomy_id"], e["taxonomy_name"]) for e in synthetic] == [
        (e["taxonomy_id"], e["taxonomy_name"]) for e in index]


def test_pcn_dataset_takes_a_random_view_in_training_and_view_00_at_test():
    items = list_items(SYNTHETIC_SAMPLE, "train")
    assert len(items) == 24 and all(len(i.partials) == 8 for i in items)
    assert all(p.name == "00.pcd" for i in list_items(SYNTHETIC_SAMPLE, "test") for p in i.partials)
    train = PCNDataset(SYNTHETIC_SAMPLE, "train", partial_points=256, seed=0)
    views = {tuple(train[0][0].sum(0).tolist()) for _ in range(20)}
    assert len(views) > 1  # different views (and resamplings) on different draws
    test = PCNDataset(SYNTHETIC_SAMPLE, "test", partial_points=256, categories=("chair",), seed=0)
    partial, complete, name = test[1]
    assert partial.shape == (256, 3) and complete.shape == (2048, 3) and name == "chair"
    assert torch.equal(partial, test[1][0])  # evaluation inputs are the same every time
    view = read_pcd(test.items[1].partials[0])
    assert set(map(tuple, partial.numpy())) <= set(map(tuple, view))
    with pytest.raises(ValueError, match="unknown categories \\['chairs'\\]; valid: airplane, cabinet"):
        PCNDataset(SYNTHETIC_SAMPLE, "test", categories=("chairs",))


def test_resample_keeps_every_point_when_it_must_repeat():
    rng = np.random.default_rng(0)
    points = np.arange(30, dtype=np.float32).reshape(10, 3)
    more = resample(points, 25, rng)
    assert more.shape == (25, 3) and {tuple(p) for p in more} == {tuple(p) for p in points}
    fewer = resample(points, 4, rng)
    assert len({tuple(p) for p in fewer}) == 4


@pytest.mark.slow
def test_the_shipped_sample_is_what_the_documented_command_generates(tmp_path):
    pytest.importorskip("trimesh")
    from tasks.point_cloud.generate import generate

    generate(tmp_path, models={"test": 1}, categories=("chair",), complete_points=2048,
             max_partial_points=384)
    for written in (tmp_path / "test").rglob("*.pcd"):
        assert written.read_bytes() == (SYNTHETIC_SAMPLE / written.relative_to(tmp_path)).read_bytes()


def test_a_depth_camera_sees_only_the_near_side_of_a_sphere():
    from tasks.point_cloud.generate import depth_camera_view

    rng = np.random.default_rng(0)
    sphere = rng.normal(size=(40000, 3))
    sphere = 0.4 * sphere / np.linalg.norm(sphere, axis=1, keepdims=True)
    direction = np.array([0.6, 0.0, 0.8])
    seen = depth_camera_view(sphere, direction, distance=2.0)
    # From distance 2, a sphere of radius 0.4 shows the cap where p . direction > 0.4^2 / 2.
    assert len(seen) > 1000
    assert (seen @ direction > 0.4**2 / 2 - 1e-3).all()


def test_fetch_pcn_explains_the_manual_steps_or_accepts_a_copy(tmp_path):
    with pytest.raises(DatasetUnavailable, match="cannot be downloaded automatically") as error:
        fetch_pcn(tmp_path / "PCN")
    assert "gateway.infinitescript.com/?fileName=ShapeNetCompletion" in str(error.value)
    assert fetch_pcn(SYNTHETIC_SAMPLE) == SYNTHETIC_SAMPLE


# --- model and task ----------------------------------------------------------------------------

TINY = PoinTrSettings(centres=16, neighbours=8, dim=32, heads=2, encoder_depth=1, decoder_depth=1,
                      queries=16, fold_step=3)


@pytest.mark.parametrize("mechanism", ["softmax", "lavo"])
@pytest.mark.slow
def test_the_model_trains_on_cpu(mechanism):
    torch.manual_seed(0)
    data = PCNDataset(SYNTHETIC_SAMPLE, "train", partial_points=128, seed=0)
    partial, complete = (torch.stack(t) for t in zip(*[data[i][:2] for i in range(0, 24, 6)]))
    attention = {role: (mechanism, {}) for role in PointCloudCompletion.roles}
    model = PoinTr(dataclasses.replace(TINY, attention=attention), backend="torch")
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        loss = model.loss(partial, complete)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.8 * losses[0], losses
    coarse, dense = model(partial)
    assert coarse.shape == (4, 32, 3) and dense.shape == (4, 16 * 9 + 128, 3)


APPLICABLE = [name for name in list_attentions(pattern="noncausal_self")
              if name in list_attentions(pattern="noncausal_cross")]


@pytest.mark.parametrize("mechanism", APPLICABLE)
def test_every_applicable_mechanism_fits_every_role(mechanism):
    attention = {role: (mechanism, {}) for role in PointCloudCompletion.roles}
    model = PoinTr(dataclasses.replace(TINY, attention=attention), backend="torch")
    partial, complete = clouds(64, 256, dtype=torch.float32)
    loss = model.loss(partial, complete)
    loss.backward()
    assert math.isfinite(loss.item())
    layers = [m for m in model.modules() if isinstance(m, MultiHeadAttention)]
    assert [type(m.attention).__name__ for m in layers] == [type(layers[0].attention).__name__] * 3
    for layer in layers:
        assert layer.q_proj.weight.grad is not None and torch.isfinite(layer.q_proj.weight.grad).all()
        assert layer.q_proj.weight.grad.abs().sum() > 0


@pytest.mark.slow
def test_the_task_runs_end_to_end(tmp_path):
    pytest.importorskip("matplotlib")  # the completion figure
    task = get_task("point_cloud")
    assert task is PointCloudCompletion
    assert task.roles == {"encoder_self": Pattern.NONCAUSAL_SELF, "decoder_self": Pattern.NONCAUSAL_SELF,
                          "cross": Pattern.NONCAUSAL_CROSS}
    config = task.make_config({"steps": "2", "partial_points": 128, "centres": 16, "queries": 16,
                               "d_model": 32, "encoder_depth": 1, "decoder_depth": 1, "fold_step": 2,
                               "figure_samples": 1})
    result = execute(task, config, AttentionChoice("softmax"), seed=0, device="cpu", workdir=tmp_path)
    assert set(result.metrics) == {"cd_l1", "cd_l2", "f_score"}
    assert all(math.isfinite(v) for v in result.metrics.values()) and 0 <= result.metrics["f_score"] <= 1
    per_category = result.extra["per_category"]
    assert sorted(per_category) == PCN_CATEGORIES.read_text().split()
    assert result.metrics["cd_l1"] == pytest.approx(np.mean([c["cd_l1"] for c in per_category.values()]))
    assert len(result.extra["loss_curve"]) == 2 and result.parameters > 0
    assert Path(result.extra["figure"]).stat().st_size > 10_000


def test_unknown_settings_are_refused():
    with pytest.raises(AttentionConfigError, match="unknown setting 'step'; valid: data, categories"):
        PointCloudCompletion.make_config({"step": 3})
    with pytest.raises(AttentionConfigError, match="geometry_backend"):
        PointCloudCompletion.make_config({"geometry_backend": "cuda"})


def test_every_attention_is_a_zoo_member():
    model = PoinTr(TINY, backend="torch")
    patterns = sorted(m.pattern.value for m in model.modules() if isinstance(m, MultiHeadAttention))
    assert patterns == ["noncausal_cross", "noncausal_self", "noncausal_self"]
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in model.modules())


def test_brute_force_references_agree_with_themselves():
    # The references are tiny enough to check by hand: two points each.
    a = np.array([[0.0, 0, 0], [1, 0, 0]])
    b = np.array([[0.0, 0, 0], [0, 2, 0]])
    assert brute_chamfer(a, b) == (pytest.approx((0.5 + 1.0) / 2), pytest.approx(0.5 + 2.0))
    assert brute_fps(np.array([[0.0, 0, 0], [0.1, 0, 0], [3, 0, 0]]), 2) == [0, 2]
    assert brute_fps(np.eye(3), 3) == [0, 1, 2]
