"""The one place for facts that several stages must agree on.

Training writes class names with these helpers, export names tensors and models with these constants,
and the client reads both back; nothing else spells them out.
"""

from __future__ import annotations

# ---- labels -------------------------------------------------------------------------------------
# Task t (0-based) adds two classes: 2t = real images of task t's source domain, 2t+1 = fakes of
# generator t. "Multi-real" scoring counts a real image predicted as ANY real class as correct.


def real_label(task: int) -> int:
    return 2 * task


def fake_label(task: int) -> int:
    return 2 * task + 1


def is_real_label(label: int) -> bool:
    return label % 2 == 0


def task_of_label(label: int) -> int:
    return label // 2


def class_names(task_names: list[str]) -> list[str]:
    """Class names in label order: real/<task>, fake/<task> for each task."""
    names: list[str] = []
    for task in task_names:
        names += [f"real/{task}", f"fake/{task}"]
    return names


# ---- Triton model and tensor names ---------------------------------------------------------------
ENSEMBLE_MODEL = "lorax"                 # uint8 images in, class probabilities out
BYTES_ENSEMBLE_MODEL = "lorax_bytes"     # encoded JPEG/PNG bytes in (decode step first)
PROTECT_MODEL = "mem_protect"            # MEM protect-on-upload
# Optional (`aigis export --fused`): version v is ensemble version v as one graph (trunk, every extractor or tail,
# classifier), same input, outputs and manifest as `lorax`. One model instead of a pipeline of steps: faster
# with a shared trunk (BENCHMARKS.md, "Shared trunk"), but each version holds every task's weights again.
FUSED_MODEL = "lorax_fused"


def extractor_model(task_name: str) -> str:
    """One Triton model per task extractor (backbone with that task's adapter merged in)."""
    return f"lorax_extractor_{task_name}"


# With a shared trunk (lora.last_blocks set) the frozen early blocks are one model that every version's
# ensemble runs once per image; each task's extractor is then the tail after it, taking TRUNK.
TRUNK_MODEL = "lorax_trunk"


# The steps that change with each ensemble version are models of their own, named by that version (each
# holds only version 1). A rollout then loads the new version's steps beside the served ones and switches
# the ensembles last: Triton never reloads a model that a served ensemble version depends on, which would
# take that ensemble down until it is loaded again.
def classifier_model(version: int | str) -> str:
    """The unified classifier over the features of tasks 1..version (python-free ONNX model)."""
    return f"lorax_classifier_v{version}"


def decode_model(version: int | str) -> str:
    """The python-backend decode step of lorax_bytes version `version`: encoded bytes -> uint8 images."""
    return f"lorax_decode_v{version}"


IMAGES = "IMAGES"              # uint8 [N, H, W, 3], already decoded and centre-cropped
IMAGE_BYTES = "IMAGE_BYTES"    # BYTES [N], encoded image files
FEATURES = "FEATURES"          # float32 [N, D], one extractor's output
TRUNK = "TRUNK"                # float32 [N, ...], the shared trunk's activations (the tails' input)


def features_input(task_index: int) -> str:
    """Classifier input fed by extractor `task_index`."""
    return f"FEATURES_{task_index}"


LOGITS = "LOGITS"              # float32 [N, C]
PROBS = "PROBS"                # float32 [N, C], softmax of LOGITS
MANIFEST_PARAMETER = "aigis_manifest"   # ensemble config parameter holding the version's manifest JSON

# Protection model tensors.
PROTECT_IMAGES = "IMAGES"          # uint8 [N, H, W, 3]
PROTECT_CAPTIONS = "CAPTIONS"      # BYTES [N]
PROTECTED_IMAGES = "PROTECTED_IMAGES"
PROTECTED_CAPTIONS = "PROTECTED_CAPTIONS"
