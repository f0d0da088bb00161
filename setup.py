"""Install cogvx-mega.

The repository keeps `kernels/`, `data/` and `tools/` at the top level for readability, but they are installed as
`cogvx_mega.kernels`, `cogvx_mega.data` and `cogvx_mega.tools`, so the package never claims generic top-level
module names. Every package is found by discovery: the packages under cogvx_mega/, each of data/ and tools/ as
cogvx_mega.<folder> with what is inside it, and each kernel package kernels/<op>/ as cogvx_mega.kernels.<op>.

kernels/ itself has no `__init__.py` (the package's own is cogvx_mega/kernels/, beside the backend choice): a
command run in the repository root (`python -m ...`, `torchrun -m ...`, setup.py itself) has the root on sys.path,
where a regular package kernels/ would shadow Hugging Face's `kernels`, which transformers imports.
"""
from setuptools import find_packages, setup


def discover_packages() -> tuple[list[str], dict[str, str]]:
    """(packages, package_dir) of everything the distribution installs."""
    packages = ["cogvx_mega", *(f"cogvx_mega.{name}" for name in find_packages("cogvx_mega"))]
    package_dir = {"cogvx_mega": "cogvx_mega"}
    for folder in ("data", "tools"):
        packages += [f"cogvx_mega.{folder}", *(f"cogvx_mega.{folder}.{name}" for name in find_packages(folder))]
        package_dir[f"cogvx_mega.{folder}"] = folder
    for name in find_packages("kernels"):
        packages.append(f"cogvx_mega.kernels.{name}")
        package_dir[f"cogvx_mega.kernels.{name}"] = f"kernels/{name.replace('.', '/')}"
    return packages, package_dir


packages, package_dir = discover_packages()

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
        # the T5 text encoder (transformers, sentencepiece), the latent cache (zarr v3, tensorstore), the clip index
        # (pyarrow: Parquet)
        # curation: shot detection (PySceneDetect, which brings OpenCV for the optical flow of motion scores)
        "data": ["av", "Pillow", "nvidia-dali-cuda130", "transformers", "sentencepiece", "zarr>=3", "tensorstore",
                 "pyarrow", "scenedetect>=0.7"],
        "triton": ["triton"],  # the Triton kernels on CPU (TRITON_INTERPRET=1); CUDA torch wheels bring it
        "wandb": ["wandb"],  # training.wandb_project: Weights & Biases beside TensorBoard
        "test": ["pytest", "pytest-timeout", "pytest-xdist", "diffusers==0.42.1", "peft", "transformers", "sentencepiece", "av", "triton",
                 "Pillow", "nvidia-dali-cuda130", "zarr>=3", "tensorstore", "pyarrow", "scenedetect>=0.7",
                 "webdataset",  # tests write image shards as img2dataset does
                 "scikit-image",  # the oracle of the VAE's SSIM
                 "wandb"],  # training.wandb_project, tested offline
    },
    entry_points={"console_scripts": ["cogvx = cogvx_mega.cli:main"]},
)
