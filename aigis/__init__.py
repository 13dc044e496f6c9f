"""aigis: continual synthetic-image attribution (LoRAX) and multimodal unlearnable examples (MEM).

Import map (each layer imports only from the layers above it in this list):
  aigis.contract, aigis.preprocess   facts shared by every stage (names, labels, image transform)
  aigis.models, aigis.data           backbones and datasets
  aigis.training                     continual LoRA training (folder training/)
  aigis.export                       ONNX export and the versioned Triton repository (folder export/)
  aigis.serving                      the embedded Triton server launcher (folder serving/)
  aigis.client                       the gRPC client library (folder client/)
  aigis.protection                   MEM protection jobs and evaluation (folder protection/)
  aigis.cli, aigis.demo              the command line on top of everything
"""

__version__ = "0.1.0"
