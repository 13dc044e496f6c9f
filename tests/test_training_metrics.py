"""Scores, herding and settings of the training stage, on hand-made inputs with hand-worked answers."""

from __future__ import annotations

import numpy as np
import pytest

from aigis.training.config import ConfigError, TrainConfig
from aigis.training.memory import ExemplarMemory, herding_order
from aigis.training.metrics import (AccuracyMatrix, binary_correct, multi_real_correct, plot_accuracy_matrix,
                                    summarize)

# ---- accuracy matrix ---------------------------------------------------------------------------------

# R[i, j]: accuracy on task i after training task j (lower triangle unused).
HAND_MATRIX = [
    [0.90, 0.80, 0.70],
    [None, 0.95, 0.85],
    [None, None, 1.00],
]


def test_summary_of_a_hand_made_matrix():
    scores = summarize(AccuracyMatrix.from_list(HAND_MATRIX).values)
    # final AA: mean of the last column.
    assert scores["average_accuracy"] == pytest.approx((0.70 + 0.85 + 1.00) / 3)
    # AIA: mean over stages of the mean of what was seen: 0.90, (0.80+0.95)/2, (0.70+0.85+1.00)/3.
    assert scores["average_incremental_accuracy"] == pytest.approx((0.90 + 0.875 + 0.85) / 3)
    # BWT over the old tasks 0 and 1: ((0.70-0.90) + (0.85-0.95)) / 2 = -0.15.
    assert scores["bwt"] == pytest.approx(-0.15)
    assert scores["forgetting"] == pytest.approx(0.15)
    # Max-drop forgetting: task 0 peaked at 0.90 -> 0.70; task 1 peaked at 0.95 -> 0.85.
    assert scores["max_drop_forgetting"] == pytest.approx((0.20 + 0.10) / 2)


def test_max_drop_forgetting_differs_from_bwt_when_a_task_improves_before_it_drops():
    R = [[0.5, 0.9, 0.6], [None, 0.8, 0.8], [None, None, 0.7]]
    scores = summarize(AccuracyMatrix.from_list(R).values)
    assert scores["bwt"] == pytest.approx(((0.6 - 0.5) + (0.8 - 0.8)) / 2)       # +0.05: "no forgetting"
    assert scores["max_drop_forgetting"] == pytest.approx(((0.9 - 0.6) + 0.0) / 2)   # 0.15 lost from the peak


def test_joint_column_has_accuracy_but_no_backward_transfer():
    scores = summarize(np.array([[0.9], [0.7], [0.8]]))
    assert scores["average_accuracy"] == pytest.approx(0.8)
    assert scores["bwt"] is None and scores["forgetting"] is None


def test_incomplete_last_column_is_refused():
    R = AccuracyMatrix(2)
    R.set(0, 0, 1.0)
    with pytest.raises(ValueError, match="last column"):
        summarize(R.values)


def test_matrix_round_trips_through_json_lists_and_plots(tmp_path):
    R = AccuracyMatrix.from_list(HAND_MATRIX)
    assert AccuracyMatrix.from_list(R.to_list()).to_list() == R.to_list()
    assert R.to_list()[1][0] is None
    plot_accuracy_matrix(R.values, ["a", "b", "c"], tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- multi-real vs binary scoring -------------------------------------------------------------------

def test_multi_real_and_binary_scoring_on_hand_made_predictions():
    # labels: 2t = real of task t, 2t+1 = fake of generator t.
    target = np.array([0, 0, 2, 1, 1, 3, 3, 2])
    predicted = np.array([2, 1, 0, 1, 3, 3, 0, 4])
    # real->other real: right; real->fake: wrong; fake->own: right; fake->other fake: wrong; fake->real: wrong.
    assert multi_real_correct(predicted, target).tolist() == [True, False, True, True, False, True, False, True]
    # binary only asks real vs fake: the fake given generator 1 instead of 0 is now right.
    assert binary_correct(predicted, target).tolist() == [True, False, True, True, True, True, False, True]


# ---- herding and the memory budget ----------------------------------------------------------------

def test_herding_picks_exactly_the_asked_number_without_repeats():
    features = np.random.default_rng(0).normal(size=(40, 6))
    order = herding_order(features, 7)
    assert len(order) == 7 and len(set(order.tolist())) == 7
    assert len(herding_order(features, 100)) == 40        # never more than there are
    assert len(herding_order(features, 0)) == 0


def test_herding_first_pick_is_closest_to_the_mean_and_the_running_mean_converges():
    rng = np.random.default_rng(1)
    features = rng.normal(size=(60, 5)) + 3.0
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    order = herding_order(features, 60)
    assert order[0] == np.argmin(np.linalg.norm(unit - unit.mean(0), axis=1))
    gap = [np.linalg.norm(unit[order[:k]].mean(0) - unit.mean(0)) for k in (1, 10, 60)]
    assert gap[2] < 1e-12 and gap[1] < gap[0]
    # Herded 10 approximate the mean better than a random 10.
    random_gap = np.linalg.norm(unit[rng.permutation(60)[:10]].mean(0) - unit.mean(0))
    assert gap[1] < random_gap


def test_memory_quota_arithmetic_and_trimming_of_old_classes():
    rng = np.random.default_rng(2)
    memory = ExemplarMemory(memory_size=10)
    paths = [f"t0/{i}.png" for i in range(30)]
    labels = np.array([0] * 15 + [1] * 15)
    memory.update(paths, labels, rng.normal(size=(30, 4)), classes_seen=2)
    assert memory.quota(2) == 5
    assert {c: len(v) for c, v in memory.by_class.items()} == {0: 5, 1: 5}
    first_of_class0 = [e.path for e in memory.by_class[0]]

    labels = np.array([2] * 12 + [3] * 2)                 # class 3 has fewer images than its quota
    memory.update([f"t1/{i}.png" for i in range(14)], labels, rng.normal(size=(14, 4)), classes_seen=4)
    assert memory.quota(4) == 10 // 4 == 2
    assert {c: len(v) for c, v in memory.by_class.items()} == {0: 2, 1: 2, 2: 2, 3: 2}
    assert [e.path for e in memory.by_class[0]] == first_of_class0[:2]     # trimmed, keeping the ranking
    assert len(memory) <= 10
    assert ExemplarMemory.from_json(memory.to_json()).to_json() == memory.to_json()


# ---- settings -----------------------------------------------------------------------------------

def test_config_reads_toml_applies_overrides_and_scales_learning_rates(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('backbone = "vit_micro"\nbatch_size = 64\n[lora]\nr = 4\n')
    config = TrainConfig.from_toml(path, {"epochs": 3, "lora.alpha": 8, "seed": None})
    assert (config.backbone, config.epochs, config.lora.r, config.lora.alpha) == ("vit_micro", 3, 4, 8)
    assert config.learning_rate(0) == pytest.approx(1e-4 * 64 / 512)
    assert config.learning_rate(3) == pytest.approx(5e-4 * 64 / 512)
    assert TrainConfig.from_dict(config.to_dict()) == config


def test_config_refuses_unknown_keys_and_bad_values(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("epoch = 3\n")
    with pytest.raises(ConfigError, match="epoch"):
        TrainConfig.from_toml(path)
    with pytest.raises(ConfigError, match="method"):
        TrainConfig.from_toml(None, {"method": "ewc"})
    with pytest.raises(ConfigError, match="lora.rank"):
        TrainConfig.from_toml(None, {"lora.rank": 4})
