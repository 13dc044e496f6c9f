"""The served `mem_protect` model: published from a surrogate artefact, answered over real gRPC.

The surrogate is a tiny random CLIP saved with save_surrogate (the artefact a protection job writes);
the server is the real tritonserver with the Python backend; the caller is aigis.client.ProtectionClient.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from aigis import contract
from aigis.protection.captions import load_images, read_pairs, synth_captioned
from aigis.protection.clip import build_clip
from aigis.protection.artefact import load_surrogate, save_surrogate
from aigis.protection.method import load_protection
from aigis.protection.per_image import PerImageMEM
from aigis.protection.served import existing_versions, publish_protect_model
from aigis.protection.settings import MEMSettings, WordCodeSettings
from aigis.protection.word_code import WordCode, WordCodeMEM, texture_owners
from aigis.protection.tokenizer import Tokenizer

SETTINGS = MEMSettings(trigger_length=3, candidates=4, pgd_steps=2, batch_size=8, seed=0)
# A word-texture job's settings (its artefact then holds the code uploads are protected with).
CODE_SETTINGS = WordCodeSettings(word_textures=40, words_per_image=3, trigger_length=5, texture_tile=4,
                                 texture_sign=True, foreign_triggers=True, seed=0)


@pytest.fixture(scope="module")
def pairs_and_surrogate(tmp_path_factory):
    base = tmp_path_factory.mktemp("served")
    root = synth_captioned(base / "captions", n_train=24, n_test=8, size=32, seed=0)
    pairs = read_pairs(root, "train.jsonl")
    tokenizer = Tokenizer.train([p.caption for p in pairs], vocab_size=600)
    model = build_clip("rn_tiny", vocab_size=tokenizer.vocab_size)
    surrogate = base / "surrogate" / "1"
    save_surrogate(surrogate, model, tokenizer, SETTINGS)
    ensemble = base / "ensemble" / "1"  # the primary and a second draw, as `--clip rn_tiny+rn_tiny` saves them
    save_surrogate(ensemble, [model, build_clip("rn_tiny", vocab_size=tokenizer.vocab_size)], tokenizer, SETTINGS)
    words = texture_owners(tokenizer, [p.caption for p in pairs], [model], CODE_SETTINGS.word_textures)
    code = WordCode(torch.rand(len(words), 4, 4, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1, words)
    coded = base / "coded" / "1"
    save_surrogate(coded, model, tokenizer, CODE_SETTINGS, word_code=code)
    images = load_images(pairs[:6], 32, progress=False)
    return {"base": base, "pairs": pairs[:6], "images": images, "surrogate": surrogate, "ensemble": ensemble,
            "coded": coded, "code": code}


def test_publishing_writes_a_self_contained_version_once(pairs_and_surrogate, tmp_path):
    repo = tmp_path / "repo"
    version = publish_protect_model(repo, pairs_and_surrogate["surrogate"], steps=2)
    assert version == 1 and existing_versions(repo) == [1]
    folder = repo / contract.PROTECT_MODEL / "1"
    assert (folder / "model.py").is_file() and (folder / "config.pbtxt").is_file()
    load_surrogate(folder / "surrogate")                      # the copy verifies against its hashes
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["settings"]["upload_steps"] == 2 and settings["settings"]["trigger_length"] == 3
    assert settings["protects_with"] == PerImageMEM.protects_with
    assert publish_protect_model(repo, pairs_and_surrogate["surrogate"], steps=2) == 1   # same artefact: no new version
    assert publish_protect_model(repo, pairs_and_surrogate["surrogate"], steps=3) == 2
    assert not any(p.name.startswith(".staging") for p in (repo / contract.PROTECT_MODEL).iterdir())


def test_protect_publish_takes_a_jobs_folder_and_keeps_a_word_code(pairs_and_surrogate, tmp_path, capsys):
    import shutil

    from aigis.cli import main

    job = tmp_path / "job"  # a job's output folder: protection.json names its surrogate
    shutil.copytree(pairs_and_surrogate["coded"], job / "surrogate" / "1")
    (job / "protection.json").write_text(json.dumps({"surrogate": {"path": "surrogate/1"}}))
    repo = tmp_path / "repo"
    assert main(["protect-publish", "--repo", str(repo), "--job", str(job), "--max-batch", "4"]) == 0
    assert f"protects with {WordCodeMEM.protects_with}" in capsys.readouterr().out
    folder = repo / contract.PROTECT_MODEL / "1"
    settings = json.loads((folder / "settings.json").read_text())
    assert settings["protects_with"] == WordCodeMEM.protects_with and settings["settings"]["word_textures"] == 40
    assert "max_batch_size: 4" in (folder / "config.pbtxt").read_text()
    # The per-image artefact: no code, a search + PGD per request.
    assert main(["protect-publish", "--repo", str(repo), "--job", str(pairs_and_surrogate["surrogate"])]) == 0
    assert "version 2" in capsys.readouterr().out
    assert json.loads((repo / contract.PROTECT_MODEL / "2" / "settings.json").read_text())["protects_with"] == \
        PerImageMEM.protects_with
    # The same artefact published the same way is that version; published another way, a new one.
    assert main(["protect-publish", "--repo", str(repo), "--job", str(job), "--max-batch", "4"]) == 0
    assert "version 1 " in capsys.readouterr().out
    assert main(["protect-publish", "--repo", str(repo), "--job", str(job), "--max-batch", "8"]) == 0
    assert "version 3 " in capsys.readouterr().out
    (job / "protection.json").write_text(json.dumps({"surrogate": {"path": "../../elsewhere"}}))
    assert main(["protect-publish", "--repo", str(repo), "--job", str(job)]) == 2
    assert "outside the job's folder" in capsys.readouterr().err
    (job / "protection.json").write_text(json.dumps({"images": []}))
    assert main(["protect-publish", "--repo", str(repo), "--job", str(job)]) == 2
    assert "no surrogate path" in capsys.readouterr().err


def test_a_broken_artefact_is_refused_before_anything_is_written(pairs_and_surrogate, tmp_path):
    broken = tmp_path / "broken"
    import shutil

    shutil.copytree(pairs_and_surrogate["surrogate"], broken)
    weights = next(broken.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-10])
    with pytest.raises(ValueError, match="sha256"):
        publish_protect_model(tmp_path / "repo", broken)
    assert not (tmp_path / "repo").exists()
    with pytest.raises(ValueError, match="runs no PGD per upload"):  # a word code has no steps to set
        publish_protect_model(tmp_path / "repo", pairs_and_surrogate["coded"], steps=2)
    with pytest.raises(FileNotFoundError, match="aigis protect"):
        publish_protect_model(tmp_path / "repo", tmp_path / "nothing")


@pytest.mark.slow
def test_served_model_protects_over_grpc(pairs_and_surrogate, tmp_path, capsys, monkeypatch):
    from aigis.client import ProtectionClient
    from aigis.client.errors import InvalidInputError
    from aigis.serving.server import TritonServer

    repo = tmp_path / "repo"
    publish_protect_model(repo, pairs_and_surrogate["surrogate"], steps=2)
    images = pairs_and_surrogate["images"]
    captions = [p.caption for p in pairs_and_surrogate["pairs"]]
    model, tokenizer, _ = load_surrogate(pairs_and_surrogate["surrogate"])
    with TritonServer(repo, models=[contract.PROTECT_MODEL]) as server:
        monkeypatch.setenv("AIGIS_CONTROL_KEY", server.control_key)   # what `aigis models rollout` reads
        with ProtectionClient(server.grpc_url, timeout_s=120) as client:
            answer = client.protect(images, captions)
            assert answer.model_version == "1"
            assert answer.images.shape == images.shape and answer.images.dtype == np.uint8
            delta = answer.images.astype(np.int16) - images.astype(np.int16)
            assert np.abs(delta).max() <= SETTINGS.epsilon_levels and np.abs(delta).max() > 0
            assert len(answer.captions) == len(captions)
            for original, protected in zip(captions, answer.captions):
                assert protected.endswith(original) and protected != original   # trigger text in front
                trigger = protected[: len(protected) - len(original)].strip()
                ids = tokenizer.encode(trigger)
                assert len(ids) == SETTINGS.trigger_length and tokenizer.decode(ids).strip() == trigger
            # The same protection in-process, through the interface the served model uses, and through the plain
            # function with the same surrogate and settings, gives the same answer.
            from aigis.protection.upload import protect_batch

            local = load_protection(pairs_and_surrogate["surrogate"], {**SETTINGS.to_dict(), "upload_steps": 2})
            in_process = local.protect(images, captions)
            assert np.array_equal(in_process.images, answer.images) and in_process.captions == answer.captions
            plain, plain_captions, _ = protect_batch(model, tokenizer, images, captions, SETTINGS, steps=2)
            assert np.array_equal(plain, answer.images) and plain_captions == answer.captions
            with pytest.raises(InvalidInputError, match="captions"):
                client.protect(images, captions[:-1])

        # An ensemble job's artefact, published as version 2 and rolled out on the running server: the
        # served noise is made against every member, as the job made it.
        from aigis.export.repository import point_to
        from aigis.protection.artefact import load_surrogates

        assert publish_protect_model(repo, pairs_and_surrogate["ensemble"], steps=2) == 2
        point_to(repo, contract.PROTECT_MODEL, 2)
        with server.control() as control:
            control.load(contract.PROTECT_MODEL)
        with ProtectionClient(server.grpc_url, timeout_s=120) as client:
            served = client.protect(images, captions)
        members, _, _ = load_surrogates(pairs_and_surrogate["ensemble"])
        expected, expected_captions, _ = protect_batch(members, tokenizer, images, captions, SETTINGS, steps=2)
        assert served.model_version == "2" and len(members) == 2
        assert np.array_equal(served.images, expected) and served.captions == expected_captions
        assert not np.array_equal(served.images, answer.images)  # not the primary alone

        # A word-code job's artefact (version 3): uploads get the job's own code, no search and no PGD.
        from aigis.protection.word_code import protect_with_word_code

        # Published and rolled out with the ops commands.
        from aigis.cli import main

        capsys.readouterr()
        assert main(["protect-publish", "--repo", str(repo), "--job", str(pairs_and_surrogate["coded"])]) == 0
        assert "mem_protect version 3" in capsys.readouterr().out
        rollout = ["models", "rollout", "--repo", str(repo), "--url", server.grpc_url, "--model", contract.PROTECT_MODEL]
        assert main([*rollout, "--version", "3"]) == 0
        assert f"{contract.PROTECT_MODEL} version 2 -> 3" in capsys.readouterr().out
        assert main([*rollout, "--version", "9"]) == 2 and "no mem_protect version 9" in capsys.readouterr().err
        assert main([*rollout, "--version", "3", "--prune"]) == 2
        with ProtectionClient(server.grpc_url, timeout_s=120) as client:
            coded = client.protect(images, captions)
        expected, expected_captions, _ = protect_with_word_code(pairs_and_surrogate["code"], tokenizer, images,
                                                                captions, CODE_SETTINGS, 32)
        assert coded.model_version == "3"
        assert np.array_equal(coded.images, expected) and coded.captions == expected_captions
        assert np.array_equal(load_protection(pairs_and_surrogate["coded"]).protect(images, captions).images, expected)
        assert np.abs(coded.images.astype(int) - images).max() == CODE_SETTINGS.epsilon_levels
        with ProtectionClient(server.grpc_url, timeout_s=120) as client:  # smaller than the code: refused, named
            with pytest.raises(InvalidInputError, match="smaller than the 32 px"):
                client.protect(np.ascontiguousarray(images[:, :16, :16]), captions)
            assert client.protect(images[:2], captions[:2]).model_version == "3"  # and the model still answers

        # A version runs only the code it was published with: under other code (as after an upgrade of aigis),
        # loading it is refused with an error naming both, and the version already served keeps answering.
        import json

        pinned = repo / contract.PROTECT_MODEL / "2" / "code.json"
        record = json.loads(pinned.read_text())
        assert record["modules"][0] == "aigis.contract" and len(record["sha256"]) == 64
        pinned.write_text(json.dumps({**record, "sha256": "0" * 64}))
        assert main([*rollout, "--version", "2"]) == 2
        error = capsys.readouterr().err
        assert "was published with aigis" in error and "runs other code" in error
        from aigis.export.repository import pointed_version

        assert pointed_version(repo, contract.PROTECT_MODEL) == 3          # a restart comes back on what is served
        with ProtectionClient(server.grpc_url, timeout_s=120) as client:
            assert client.protect(images[:2], captions[:2]).model_version == "3"
        pinned.write_text(json.dumps(record))
        assert main([*rollout, "--version", "2"]) == 0                       # its own code: served again
        with ProtectionClient(server.grpc_url, timeout_s=120) as client:
            assert client.protect(images[:2], captions[:2]).model_version == "2"
