"""Install cogvx-mega.

The repository keeps `kernels/`, `data/` and `tools/` at the top level for readability, but
they are installed as `cogvx_mega.kernels`, `cogvx_mega.data` and `cogvx_mega.tools` so the
package never claims generic top-level module names.
"""
from setuptools import setup

TOP_LEVEL_SUBPACKAGES = {"kernels": "kernels", "data": "data", "tools": "tools"}

packages = [
    "cogvx_mega",
    "cogvx_mega.config",
    "cogvx_mega.model",
    "cogvx_mega.parallel",
    "cogvx_mega.diffusion",
    "cogvx_mega.training",
    "cogvx_mega.vae",
    "cogvx_mega.checkpoint",
]
package_dir = {"cogvx_mega": "cogvx_mega"}
for name, folder in TOP_LEVEL_SUBPACKAGES.items():
    packages.append(f"cogvx_mega.{name}")
    package_dir[f"cogvx_mega.{name}"] = folder
packages.append("cogvx_mega.kernels.causal_pad")
package_dir["cogvx_mega.kernels.causal_pad"] = "kernels/causal_pad"

setup(
    name="cogvx-mega",
    version="0.1.0",
    description="Megatron-style 3D-parallel training for CogVideoX-class text-to-video transformers",
    python_requires=">=3.11",
    packages=packages,
    package_dir=package_dir,
    install_requires=[
        "torch>=2.4",
        "megatron-core==0.16.1",
        "numpy",
        "packaging",
        "psutil",  # megatron's checkpoint writer needs it but does not declare it
        "safetensors",
        "pyyaml",
        "tqdm",
        "matplotlib",
        "tensorboard",  # the event files of `training.tensorboard` (torch.utils.tensorboard writes them)
        "scipy",  # `cogvx scaling fit`
        "google-crc32c",  # checksums of every checkpoint file (`cogvx checkpoint verify`, resume)
    ],
    extras_require={
        "gpu": ["transformer-engine[pytorch]", "pynvml"],
        "flash": ["flash-attn"],
        "video": ["av"],  # `cogvx vae encode|decode` reads and writes video files with PyAV
        # `cogvx data`: probing and decoding media (PyAV, Pillow, DALI: its CPU pipelines run without a GPU),
        # the T5 text encoder (transformers, sentencepiece), the latent cache (zarr v3, tensorstore)
        "data": ["av", "Pillow", "nvidia-dali-cuda130", "transformers", "sentencepiece", "zarr>=3", "tensorstore"],
        "triton": ["triton"],  # the Triton kernels on CPU (TRITON_INTERPRET=1); CUDA torch wheels bring it
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "diffusers==0.42.1", "peft", "transformers", "sentencepiece", "av", "triton",
                 "Pillow", "nvidia-dali-cuda130", "zarr>=3", "tensorstore"],
    },
    entry_points={"console_scripts": ["cogvx = cogvx_mega.cli:main"]},
)
