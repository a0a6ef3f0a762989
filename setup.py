"""Maps the repository folders onto the `selfflow` namespace.

`platform/` is installed as `selfflow.platform` and `components/` as
`selfflow.components`, so nothing in this repository can shadow the standard
library's `platform` module. pyproject.toml holds all other metadata.
"""
from setuptools import find_packages, setup

FOLDERS = {"platform": "selfflow.platform", "components": "selfflow.components"}

packages, package_dir = [], {}
for folder, name in FOLDERS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
