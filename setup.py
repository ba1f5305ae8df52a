"""Package discovery for setuptools (the project's metadata is in pyproject.toml).

The three source folders install under one import package, ``gamguard``, so nothing generic
(``runtime``, ``proto``) lands at the top of a user's site-packages: ``exporter/`` ->
``gamguard.exporter``, ``runtime/`` -> ``gamguard.runtime``, ``proto/`` -> ``gamguard.proto``. Every
subpackage (and data folder, such as the embedded demo bundle) under them is found here, so a new one
cannot be missing from the wheel
(``tests/test_packaging.py`` builds the wheel and checks its file list).
"""

from setuptools import find_namespace_packages, setup

ROOTS = {"exporter": "gamguard.exporter", "runtime": "gamguard.runtime", "proto": "gamguard.proto"}

setup(
    packages=[
        f"{name}.{sub}" if sub else name
        for folder, name in ROOTS.items()
        for sub in ["", *find_namespace_packages(folder, exclude=["*__pycache__*"])]
    ],
    package_dir={name: folder for folder, name in ROOTS.items()},
)
