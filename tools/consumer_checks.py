"""What ilastik and BiaPy check before they take a bioimage.io package, run on one here (docs/bioimageio.md).

    .venv-torch/bin/python tools/consumer_checks.py ilastik isbi-membrane-unet.zip
    pip download --no-deps biapy==3.7.1 -d /tmp/biapy && unzip -q /tmp/biapy/*.whl -d /tmp/biapy
    .venv-torch/bin/python tools/consumer_checks.py biapy isbi-membrane-unet.zip /tmp/biapy/biapy/models/__init__.py

ilastik: its Neural Network workflow packs a model with bioimageio.spec's get_resource_package_content and the
weights priority ("torchscript", "pytorch_state_dict") (ilastik/applets/neuralNetwork/bioimageiodl.py), which
fails for a package without either. BiaPy: its own check_bmz_model_compatibility (biapy/models/__init__.py,
the function bioimage.io's CI runs), taken from the wheel's source alone, as BiaPy's module imports need its
whole stack. Needs bioimageio.spec (the torch venv has it); neither tool is installed.
"""

import ast
import sys
import typing
import zipfile


def ilastik(package):
    from bioimageio.spec import ValidationContext, get_resource_package_content, load_description

    descr = load_description(package, format_version="latest", perform_io_checks=False)
    with ValidationContext(perform_io_checks=False):
        content = get_resource_package_content(descr, weights_priority_order=("torchscript", "pytorch_state_dict"))
    return sorted(content)


def biapy(package, source):
    from packaging.version import Version
    from ruyaml import YAML

    with open(source) as f:
        tree = ast.parse(f.read())
    (function,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "check_bmz_model_compatibility"]
    names = {"Version": Version, **{k: getattr(typing, k) for k in ("Dict", "Optional", "List", "Tuple", "Any")}}
    exec(compile(ast.Module(body=[function], type_ignores=[]), source, "exec"), names)
    with zipfile.ZipFile(package) as z:
        rdf = YAML(typ="safe").load(z.read("rdf.yaml"))
    return names["check_bmz_model_compatibility"](rdf)


if __name__ == "__main__":
    tool, *args = sys.argv[1:]
    print({"ilastik": ilastik, "biapy": biapy}[tool](*args))
