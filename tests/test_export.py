"""Export to the versioned Triton repository, validation, and the end-to-end path through the real server.

A tiny random-init model (vit_micro, 32 px) is trained on a tiny synthetic benchmark, exported, served by
the real tritonserver and called over gRPC with the client library; then a third task is trained,
exported as version 3, rolled out with no restart, and rolled back.
"""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from aigis import contract
from aigis.cli import main as aigis_main
from aigis.data.cddb import CDDB
from aigis.export import export_run, load_version, served_version, validate, versions
from aigis.export.configs import read_config, to_pbtxt
from aigis.export.repository import RepositoryError, notes, pointed_version
from aigis.training.config import TrainConfig
from aigis.training.run import ContinualRun, load_run
from tiny_run import TASKS, TINY, file_digests, synthetic_root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> dict:
    """A synthetic root, a run trained on two tasks, and a repository holding its version 2."""
    base = tmp_path_factory.mktemp("export")
    root = synthetic_root(base)
    run = base / "run"
    config = TrainConfig.from_dict(TINY)
    ContinualRun(config, CDDB(root, TASKS[:2], progress=False), run, progress=False).run()
    repo = base / "repo"
    report = export_run(run, repo, data_root=root, progress=False)
    return {"root": root, "run": run, "repo": repo, "report": report, "config": config, "base": base}


def val_images(root: Path, tasks: list[str], crop: int) -> tuple[np.ndarray, list[Path]]:
    from aigis import preprocess

    data = CDDB(root, tasks, progress=False)
    paths = [s.path for t in range(len(tasks)) for s in data.samples(t, "val")]
    return np.stack([preprocess.eval_view_from_file(p, crop) for p in paths]), paths


def test_export_writes_checked_versioned_models(workspace):
    repo, report = workspace["repo"], workspace["report"]
    assert report.version == 2 and report.tasks == TASKS[:2]
    assert {c.inputs for c in report.checks} == {"random", "real images"}
    assert {c.runtime for c in report.checks} == {"onnxruntime", "openvino"}   # both runtimes that may serve it
    assert all(c.ok and c.max_abs_diff < 1e-3 for c in report.checks)
    assert versions(repo, contract.ENSEMBLE_MODEL) == [2]
    assert versions(repo, contract.extractor_model("tconv")) == [1]
    manifest = json.loads(read_config(repo / "lorax" / "2" / "config.pbtxt")["parameters"]
                          [contract.MANIFEST_PARAMETER]["string_value"])
    assert manifest["tasks"] == TASKS[:2] and manifest["class_names"] == contract.class_names(TASKS[:2])
    assert manifest["crop"] == 32 and manifest["version"] == "2" and len(manifest["source_sha256"]) == 64
    classifier = read_config(repo / contract.classifier_model(2) / "1" / "config.pbtxt")
    probs = next(o for o in classifier["output"] if o["name"] == contract.PROBS)
    assert (repo / contract.classifier_model(2) / probs["label_filename"]).read_text().split() == \
        contract.class_names(TASKS[:2])                  # Triton's classification extension names the classes
    extractor = read_config(repo / contract.extractor_model("tconv") / "1" / "config.pbtxt")
    for config in (classifier, extractor):             # loaded models are warm before their first request
        (warm,) = config["model_warmup"]
        assert warm["batch_size"] == 1 and set(warm["inputs"]) == {i["name"] for i in config["input"]}
    assert validate(repo) == []


def test_onnx_models_compute_what_pytorch_computes(workspace):
    import onnxruntime as ort

    model = load_run(workspace["run"])
    images, _ = val_images(workspace["root"], TASKS[:2], 32)
    features = []
    for k, task in enumerate(TASKS[:2]):
        session = ort.InferenceSession(str(workspace["repo"] / contract.extractor_model(task) / "1" / "model.onnx"))
        got = session.run(None, {contract.IMAGES: images})[0]
        with torch.no_grad():
            trunk = model.trunk_features(model.image_input(torch.from_numpy(images)))
            unmerged = model.task_features(trunk, k).numpy()
        assert np.abs(got - unmerged).max() < 1e-4 * max(1.0, np.abs(unmerged).max())
        features.append(got)
    classifier = ort.InferenceSession(str(workspace["repo"] / contract.classifier_model(2) / "1" / "model.onnx"))
    probs = classifier.run([contract.PROBS], {contract.features_input(k): f for k, f in enumerate(features)})[0]
    with torch.no_grad():
        expected = torch.softmax(model(torch.from_numpy(images)), 1).numpy()
    assert np.abs(probs - expected).max() < 1e-4


def test_a_shared_trunk_is_exported_once_and_its_ensemble_computes_the_model(two_version_source, tmp_path):
    """lora.last_blocks: one trunk model for every version, one tail per task taking its activations, wired
    trunk -> tails -> classifier; the pieces together answer what the in-process model answers."""
    import onnxruntime as ort

    repo = two_version_source["repo"]
    assert versions(repo, contract.TRUNK_MODEL) == [1] and versions(repo, contract.ENSEMBLE_MODEL) == [2, 3]
    for task in TASKS:
        config = read_config(repo / contract.extractor_model(task) / "1" / "config.pbtxt")
        assert [i["name"] for i in config["input"]] == [contract.TRUNK]
    for version in (2, 3):
        steps = read_config(repo / "lorax" / str(version) / "config.pbtxt")["ensemble_scheduling"]["step"]
        assert [s["model_name"] for s in steps] == [contract.TRUNK_MODEL] + [
            contract.extractor_model(t) for t in TASKS[:version]] + [contract.classifier_model(version)]
    # Version 3 added one tail and its own steps and rewrote nothing: every file version 2 left (the trunk, the
    # old tails, version 2's classifier and steps) has the same bytes and was not even touched.
    before = two_version_source["before_version_3"]
    now = file_digests(repo)
    assert {path: now.get(path) for path in before} == before
    added = {path.split("/")[0] for path in set(now) - set(before)}
    assert added == {contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL, contract.classifier_model(3),
                     contract.decode_model(3), contract.extractor_model("bilinear")}
    assert validate(repo) == []

    def run(name: str, feeds: dict) -> list:
        return ort.InferenceSession(str(repo / name / "1" / "model.onnx")).run(None, feeds)

    trunk = run(contract.TRUNK_MODEL, {contract.IMAGES: two_version_source["images"]})[0]
    for version in (2, 3):
        features = [run(contract.extractor_model(t), {contract.TRUNK: trunk})[0] for t in TASKS[:version]]
        probs = run(contract.classifier_model(version), {contract.features_input(k): f for k, f in enumerate(features)})[1]
        names = contract.class_names(TASKS[:version])
        assert [names[k] for k in probs.argmax(1)] == two_version_source["expected"][str(version)]

    # A trunk cut elsewhere (or from other weights) is never mixed in: the export is refused, naming the trunk.
    other = tmp_path / "repo"
    shutil.copytree(repo, other, ignore=shutil.ignore_patterns("lorax", "lorax_bytes", "lorax_classifier_v*",
                                                               "lorax_decode_v*"))
    source = other / contract.TRUNK_MODEL / "1" / "source.json"
    source.write_text(json.dumps({**json.loads(source.read_text()), "trunk_split": 0}))
    with pytest.raises(RepositoryError, match="lorax_trunk holds another trunk"):
        export_run(two_version_source["run"], other, num_tasks=1, progress=False)


def test_a_fused_version_of_every_block_computes_the_model(workspace, tmp_path):
    """export --fused on a model that adapts every block: one graph, images -> every extractor -> classifier."""
    import onnxruntime as ort

    repo = tmp_path / "repo"
    shutil.copytree(workspace["repo"], repo)
    report = export_run(workspace["run"], repo, fused=True, progress=False)
    assert report.written == [contract.FUSED_MODEL] and contract.ENSEMBLE_MODEL in report.reused
    assert {c.runtime for c in report.checks if c.model.startswith(f"{contract.FUSED_MODEL}/2")} == {
        "onnxruntime", "openvino"}
    assert all(c.ok for c in report.checks) and validate(repo) == []
    images, _ = val_images(workspace["root"], TASKS[:2], 32)
    session = ort.InferenceSession(str(repo / contract.FUSED_MODEL / "2" / "model.onnx"))
    logits, probs = session.run([contract.LOGITS, contract.PROBS], {contract.IMAGES: images})
    with torch.no_grad():
        expected = load_run(workspace["run"])(torch.from_numpy(images)).numpy()
    assert np.abs(logits - expected).max() <= 1e-4 * (1 + np.abs(expected).max())
    assert (probs.argmax(1) == expected.argmax(1)).all()
    assert export_run(workspace["run"], repo, fused=True, progress=False).already_published


@pytest.mark.slow
def test_a_fused_version_answers_as_its_ensemble_and_moves_with_it(two_version_source, tmp_path, monkeypatch):
    """A shared-trunk version published again as one graph (export --fused) answers over gRPC what its ensemble
    answers, class names included; a rollout moves it with the ensemble, and one to a version exported without
    it unloads it (it would answer for another version); a server starting on such a repository leaves it out."""
    import tritonclient.grpc as grpcclient

    from aigis.client import AttributionClient
    from aigis.export.repository import point_to
    from aigis.export.rollout import load_model_version
    from aigis.serving.cli import default_models
    from aigis.serving.server import TritonServer

    run, images, expected = two_version_source["run"], two_version_source["images"], two_version_source["expected"]
    repo = tmp_path / "repo"
    shutil.copytree(two_version_source["repo"], repo, ignore=shutil.ignore_patterns(".*", "__pycache__"))
    report = export_run(run, repo, num_tasks=2, fused=True, progress=False)   # version 2 only
    assert report.written == [contract.FUSED_MODEL] and all(c.ok for c in report.checks)
    assert versions(repo, contract.FUSED_MODEL) == [2] and validate(repo) == []
    assert aigis_main(["models", "validate", "--repo", str(repo)]) == 0

    with TritonServer(repo, models=[]) as server, server.control() as control:
        monkeypatch.setenv("AIGIS_CONTROL_KEY", server.control_key)
        load_version(control, repo, 2)
        assert control.is_ready(contract.FUSED_MODEL, "2")
        with AttributionClient(server.grpc_url) as ensemble, \
                AttributionClient(server.grpc_url, model=contract.FUSED_MODEL) as fused:
            by_steps, at_once = ensemble.attribute(images), fused.attribute(images)
            assert fused.manifest.tasks == tuple(TASKS[:2])
        assert [a.label for a in at_once] == [a.label for a in by_steps] == expected["2"]
        assert {a.model_version for a in at_once} == {"2"}
        assert np.allclose([a.fake_score for a in at_once], [a.fake_score for a in by_steps], atol=1e-4)
        with grpcclient.InferenceServerClient(server.grpc_url) as plain:   # the classification extension
            tensor = grpcclient.InferInput(contract.IMAGES, [3, 32, 32, 3], "UINT8")
            tensor.set_data_from_numpy(images[:3])
            top = plain.infer(contract.FUSED_MODEL, [tensor], outputs=[
                grpcclient.InferRequestedOutput(contract.PROBS, class_count=1)]).as_numpy(contract.PROBS)
        assert [row[0].decode().split(":")[2] for row in top] == expected["2"][:3]

        assert aigis_main(["models", "rollout", "--repo", str(repo), "--url", server.grpc_url, "--version", "3"]) == 0
        assert contract.FUSED_MODEL not in control.loaded()          # version 3 has none
        assert aigis_main(["models", "rollout", "--repo", str(repo), "--url", server.grpc_url, "--version", "2"]) == 0
        assert control.is_ready(contract.FUSED_MODEL, "2") and served_version(control) == 2
        with pytest.raises(RepositoryError, match="moves with the ensemble's version"):
            load_model_version(control, repo, contract.FUSED_MODEL, 2)

    assert contract.FUSED_MODEL in default_models(repo)
    point_to(repo, contract.ENSEMBLE_MODEL, 3)
    assert contract.FUSED_MODEL not in default_models(repo)


def test_versions_are_never_rewritten(workspace, tmp_path):
    repo = workspace["repo"]
    before = {p: p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()}
    again = export_run(workspace["run"], repo, progress=False)
    assert again.already_published and again.written == []
    assert {p: p.stat().st_mtime_ns for p in repo.rglob("*") if p.is_file()} == before

    # Another run (other seed -> other adapters) into the same repository is refused, naming the model.
    other = tmp_path / "other"
    ContinualRun(TrainConfig.from_dict({**TINY, "seed": 11}), CDDB(workspace["root"], TASKS[:2], progress=False),
                 other, progress=False).run()
    with pytest.raises(RepositoryError, match="version 2 exists"):
        export_run(other, repo, progress=False)
    with pytest.raises(RepositoryError, match="another adapter for task 'tconv'"):
        export_run(other, repo, num_tasks=1, progress=False)
    assert versions(repo, contract.ENSEMBLE_MODEL) == [2]
    assert not any(p.name.startswith(".staging") for p in repo.rglob("*"))


def test_validate_names_every_problem(workspace, tmp_path):
    broken = tmp_path / "repo"
    shutil.copytree(workspace["repo"], broken)
    assert validate(broken) == []
    shutil.rmtree(broken / contract.extractor_model("nearest"))
    config = read_config(broken / contract.classifier_model(2) / "1" / "config.pbtxt")
    config["input"][0]["data_type"] = "TYPE_FP16"
    (broken / contract.classifier_model(2) / "1" / "config.pbtxt").write_text(to_pbtxt(config))
    (broken / contract.ENSEMBLE_MODEL / ".staging-3-abc").mkdir()
    problems = "\n".join(validate(broken))
    assert "lorax_extractor_nearest version 1 does not exist" in problems
    assert "FEATURES_0 is TYPE_FP16 in the config, TYPE_FP32 in model.onnx" in problems
    assert ".staging-3-abc" not in problems                  # a writer's leftover serves nothing: a note
    assert any(".staging-3-abc: left by an interrupted writer" in note for note in notes(broken))
    assert "lorax_classifier_v2/config.pbtxt is not the config of any one of its versions [1]" in problems
    assert aigis_main(["models", "validate", "--repo", str(broken)]) == 1


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.slow
def test_end_to_end_serve_add_a_task_roll_forward_and_back(workspace, capsys, monkeypatch):
    from aigis.client import AttributionClient
    from aigis.serving.server import TritonServer

    root, run, repo = workspace["root"], workspace["run"], workspace["repo"]
    images, paths = val_images(root, TASKS, 32)
    two = load_run(run)
    with torch.no_grad():
        local_two = two(torch.from_numpy(images)).argmax(1).numpy()

    with TritonServer(repo, models=[]) as server, server.control() as control:
        monkeypatch.setenv("AIGIS_CONTROL_KEY", server.control_key)   # what `aigis models rollout` reads
        load_version(control, repo, 2)
        assert served_version(control) == 2
        with AttributionClient(server.grpc_url) as client:
            answers = client.attribute(images)
            assert client.manifest.tasks == tuple(TASKS[:2])
        names = contract.class_names(TASKS[:2])
        assert [names.index(a.label) for a in answers] == local_two.tolist()
        assert {a.model_version for a in answers} == {"2"}
        with AttributionClient(server.grpc_url, model=contract.BYTES_ENSEMBLE_MODEL) as thin:
            from_bytes = thin.attribute([png_bytes(image) for image in images[:6]])
        assert [a.label for a in from_bytes] == [a.label for a in answers[:6]]
        import tritonclient.grpc as grpcclient   # the classification extension, for callers without the client

        with grpcclient.InferenceServerClient(server.grpc_url) as plain:
            tensor = grpcclient.InferInput(contract.IMAGES, [2, 32, 32, 3], "UINT8")
            tensor.set_data_from_numpy(images[:2])
            top = plain.infer(contract.ENSEMBLE_MODEL, [tensor], outputs=[
                grpcclient.InferRequestedOutput(contract.PROBS, class_count=1)]).as_numpy(contract.PROBS)
        assert [row[0].decode().split(":")[2] for row in top] == [a.label for a in answers[:2]]
        assert np.allclose([a.fake_score for a in from_bytes], [a.fake_score for a in answers[:6]], atol=1e-6)

        # A third task: train on, export version 3 (one new extractor, new classifier and ensembles).
        ContinualRun(workspace["config"], CDDB(root, TASKS, progress=False), run, resume=True, progress=False).run()
        assert aigis_main(["export", "--run", str(run), "--repo", str(repo), "--quiet"]) == 0
        assert versions(repo, contract.ENSEMBLE_MODEL) == [2, 3]
        assert versions(repo, contract.classifier_model(2)) == [1] == versions(repo, contract.classifier_model(3))
        assert versions(repo, contract.extractor_model("tconv")) == [1]
        assert validate(repo) == []
        # Publishing never changes what is served: the pointers still name version 2.
        assert pointed_version(repo, contract.ENSEMBLE_MODEL) == 2 == pointed_version(repo, contract.BYTES_ENSEMBLE_MODEL)
        with AttributionClient(server.grpc_url) as client:
            assert client.manifest.tasks == tuple(TASKS[:2])
        pid = server.pid

        assert aigis_main(["models", "rollout", "--repo", str(repo), "--url", server.grpc_url, "--version", "3"]) == 0
        assert "version 2 -> 3" in capsys.readouterr().out
        three = load_run(run)
        with torch.no_grad():
            local_three = three(torch.from_numpy(images)).argmax(1).numpy()
        with AttributionClient(server.grpc_url) as client:
            assert client.manifest.tasks == tuple(TASKS)
            answers = client.attribute(images)
        assert [contract.class_names(TASKS).index(a.label) for a in answers] == local_three.tolist()
        assert {a.model_version for a in answers} == {"3"}

        assert contract.extractor_model("bilinear") in control.loaded()
        assert aigis_main(["models", "rollout", "--repo", str(repo), "--url", server.grpc_url, "--version", "2",
                           "--prune"]) == 0
        out = capsys.readouterr().out
        assert "version 3 -> 2" in out and "lorax_extractor_bilinear" in out.split("unloaded")[1]
        assert contract.extractor_model("bilinear") not in control.loaded()
        with AttributionClient(server.grpc_url) as client:
            assert client.manifest.tasks == tuple(TASKS[:2])
            assert [names.index(a.label) for a in client.attribute(images)] == local_two.tolist()
        assert server.pid == pid and server.is_running()      # the same process throughout: no restart
        # the old version's own steps are retired once it has drained; the served version's stay
        assert contract.classifier_model(3) not in control.loaded() and contract.decode_model(3) not in control.loaded()
        assert {contract.classifier_model(2), contract.decode_model(2)} <= set(control.loaded())
        assert pointed_version(repo, contract.extractor_model("bilinear")) == 1
        # Serving wrote nothing into the version folders (a __pycache__ there would make Triton load a Python
        # step a second time with the ensemble that uses it): version 3's decode step was loaded once.
        assert not [path for path in repo.rglob("__pycache__") if path.is_dir()]
        assert server.log_tail(100_000).count(f"successfully loaded '{contract.decode_model(3)}'") == 1
        assert validate(repo) == []           # the pointers agree with the served ensemble's steps
        assert aigis_main(["models", "rollout", "--repo", str(repo), "--url", server.grpc_url, "--version", "9"]) == 2
        assert "no ensemble version 9" in capsys.readouterr().err
        # --model rolls stand-alone models only: a step of the ensemble moves with it, never alone
        assert aigis_main(["models", "rollout", "--repo", str(repo), "--url", server.grpc_url, "--version", "1",
                           "--model", contract.classifier_model(2)]) == 2
        assert "is a step of" in capsys.readouterr().err


def test_cli_lists_versions_and_refuses_bad_runs(workspace, tmp_path, capsys):
    assert aigis_main(["models", "list", "--repo", str(workspace["repo"]), "--json"]) == 0
    rows = {row["model"]: row for row in json.loads(capsys.readouterr().out)}
    assert rows[contract.ENSEMBLE_MODEL]["tasks"]["2"] == TASKS[:2]
    assert aigis_main(["export", "--run", str(tmp_path / "nothing"), "--repo", str(tmp_path / "r"), "--quiet"]) == 2
    assert "no manifest.json" in capsys.readouterr().err
    assert aigis_main(["export", "--run", str(workspace["run"]), "--repo", str(tmp_path / "r"),
                       "--tensorrt-fp16", "--quiet"]) == 2
    assert "--tensorrt-fp16 needs --gpu" in capsys.readouterr().err


def test_cpu_configs_give_each_instance_one_thread_and_the_openvino_accelerator(workspace):
    from aigis.export.configs import TargetOptions, extractor_config

    # What export wrote: the ensemble's extractors run at once, so each gets one thread, not a pool per core.
    written = read_config(workspace["repo"] / contract.extractor_model("tconv") / "config.pbtxt")
    assert written["parameters"]["intra_op_thread_count"] == {"string_value": "1"}
    assert written["parameters"]["inter_op_thread_count"] == {"string_value": "1"}
    assert "parameters" not in extractor_config("tconv", 32, 16, TargetOptions(cpu_threads=0))  # onnxruntime's default
    assert "parameters" not in extractor_config("tconv", 32, 16, TargetOptions(gpu=True))
    assert extractor_config("tconv", 32, 16, TargetOptions(cpu_threads=2))["parameters"]["intra_op_thread_count"] == \
        {"string_value": "2"}
    with pytest.raises(ValueError, match="cpu threads must be 0"):
        TargetOptions(cpu_threads=-1).validate()
    # Triton's own field for it, so NVIDIA's container reads the same config.
    openvino = {"execution_accelerators": {"cpu_execution_accelerator": [{"name": "openvino"}]}}
    assert written["optimization"] == openvino
    assert "optimization" not in extractor_config("tconv", 32, 16, TargetOptions(cpu_accelerator="none"))
    assert "cpu_execution_accelerator" not in str(extractor_config("tconv", 32, 16, TargetOptions(gpu=True)))
    assert TargetOptions(cpu_accelerator="none").runtimes == ["onnxruntime"]
    with pytest.raises(ValueError, match="cpu accelerator must be one of openvino, none"):
        TargetOptions(cpu_accelerator="fastcpu").validate()


def test_export_checks_share_one_openvino_core():
    """OpenVINO wants one Core per process (a second one hung a later compile_model)."""
    from aigis.openvino_cpu import core

    assert core() is core()


def test_gpu_configs_and_tensorrt_plans(workspace, tmp_path):
    from aigis.export.configs import TargetOptions, extractor_config
    from aigis.export.tensorrt_plan import build_plans, tensorrt_available

    config = extractor_config("tconv", 32, 16, TargetOptions(gpu=True, tensorrt_fp16=True))
    text = to_pbtxt(config)
    assert "KIND_GPU" in text and 'name: "tensorrt"' in text and "FP16" in text
    reason = tensorrt_available()
    if reason is not None:
        with pytest.raises(RuntimeError, match="cannot build tensorrt_plan"):
            build_plans(workspace["repo"], TASKS[:1])
        pytest.skip(f"tensorrt_plan engines not built: {reason}")
    repo = tmp_path / "repo"
    shutil.copytree(workspace["repo"], repo)
    lines = build_plans(repo, TASKS[:2])
    assert len(lines) == 2 and (repo / (contract.extractor_model("tconv") + "_trt") / "1" / "model.plan").is_file()


def test_an_interrupted_export_is_finished_and_validate_reports_it(workspace, tmp_path):
    repo = tmp_path / "repo"
    shutil.copytree(workspace["repo"], repo)
    # As if the export died after publishing the classifier and the decode step, before the ensembles (whose
    # first version arrives as the whole model folder).
    for name in (contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL):
        shutil.rmtree(repo / name)
    assert validate(repo) == []                                  # part of a version serves nothing...
    assert any("version 2 is incomplete: lorax/2, lorax_bytes/2 missing" in p for p in notes(repo))
    classifier_before = (repo / contract.classifier_model(2) / "1" / "model.onnx").stat().st_mtime_ns

    report = export_run(workspace["run"], repo, num_tasks=2, progress=False)    # the run may hold 3 tasks by now
    assert not report.already_published
    assert report.written == [contract.ENSEMBLE_MODEL, contract.BYTES_ENSEMBLE_MODEL]
    assert contract.classifier_model(2) in report.reused and contract.extractor_model("tconv") in report.reused
    assert (repo / contract.classifier_model(2) / "1" / "model.onnx").stat().st_mtime_ns == classifier_before
    assert validate(repo) == []
    assert export_run(workspace["run"], repo, num_tasks=2, progress=False).already_published


def test_export_refuses_to_publish_beyond_the_tolerance(workspace, tmp_path, capsys):
    repo = tmp_path / "repo"
    assert aigis_main(["export", "--run", str(workspace["run"]), "--repo", str(repo), "--tasks", "1",
                       "--rtol", "1e-9", "--quiet"]) == 2
    assert "refusing to publish: lorax_extractor_tconv: max |onnxruntime - torch|" in capsys.readouterr().err
    assert not any(p.is_file() or p.name.isdigit() for p in repo.rglob("*"))     # nothing published, no leftovers


@pytest.mark.slow
def test_the_decode_step_decodes_with_the_code_its_version_was_exported_with(workspace, tmp_path):
    """lorax_decode_v<k> carries its code (model.py and a copy of aigis.preprocess): the served version runs
    that copy, not whatever aigis is installed, so rolling back a version rolls back its decoding."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from aigis import preprocess
    from aigis.export import decode_model
    from aigis.serving.server import TritonServer

    repo = tmp_path / "repo"
    shutil.copytree(workspace["repo"], repo)
    version_dir = repo / contract.decode_model(2) / "1"
    assert (version_dir / "model.py").read_bytes() == Path(decode_model.__file__).read_bytes()
    copy = version_dir / decode_model.PREPROCESS_COPY
    assert copy.read_bytes() == Path(preprocess.__file__).read_bytes()
    # Stand in for "the code this version was exported with" differing from the installed package's.
    copy.write_text(copy.read_text().replace('raise BadImageError(f"{name}: empty file")',
                                             'raise BadImageError(f"{name}: empty file")\n'
                                             '    raise BadImageError(f"{name}: decoded by the version\'s own copy")'))
    images, _ = val_images(workspace["root"], TASKS[:2], 32)
    with TritonServer(repo, models=[contract.BYTES_ENSEMBLE_MODEL]) as server:
        with grpcclient.InferenceServerClient(server.grpc_url) as client:
            data = np.array([[png_bytes(images[0])]], dtype=object)
            tensor = grpcclient.InferInput(contract.IMAGE_BYTES, list(data.shape), "BYTES")
            tensor.set_data_from_numpy(data)
            with pytest.raises(InferenceServerException, match="decoded by the version's own copy"):
                client.infer(contract.BYTES_ENSEMBLE_MODEL, [tensor])
