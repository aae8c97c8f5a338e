from setuptools import find_packages, setup

setup(
    name="d2norm",
    version="0.1.0",
    description="Small-batch normalization layers (CBN, MABN, PreciseBN) for Detectron2",
    packages=find_packages(include=["d2norm", "d2norm.*"]),
    python_requires=">=3.8",
    # torch, torchvision and detectron2 are installed by the Makefile (or already present on a
    # cluster); listing them here would make pip try to replace an existing from-source build.
    # OpenCV (any build: opencv-python or -headless, needed by the built-in dataset) is left out for
    # the same reason, as detectron2 does.
    install_requires=["fvcore", "pycocotools", "numpy"],
)
