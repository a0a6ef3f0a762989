"""Maps the repository folders onto the `selfflow` namespace.

`platform/` is installed as `selfflow.platform`, `components/` as `selfflow.components` and the gin
files in `experiments/` as package data of `selfflow.experiments`, so nothing in this repository can
shadow the standard library's `platform` module and an installed wheel finds its presets.
pyproject.toml holds all other metadata.
"""
from setuptools import find_packages, setup

FOLDERS = {"platform": "selfflow.platform", "components": "selfflow.components"}

packages, package_dir = [], {}
for folder, name in FOLDERS.items():
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]
# The experiments are gin files only (no __init__.py): a data-only package.
package_dir["selfflow.experiments"] = "experiments"
packages.append("selfflow.experiments")

setup(packages=packages, package_dir=package_dir, package_data={"selfflow.experiments": ["**/*.gin"]})
