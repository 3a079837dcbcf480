import shlex
from configparser import ConfigParser

import setuptools

config = ConfigParser(delimiters=["="])
config.read("settings.ini", encoding="utf-8")
cfg = config["DEFAULT"]

expected = "version description keywords author author_email lib_name user branch license status min_python audience language".split()
for o in expected: assert o in cfg, f"missing expected setting: {o}"

licenses = {"apache2": ("Apache Software License 2.0", "OSI Approved :: Apache Software License")}
statuses = ["1 - Planning", "2 - Pre-Alpha", "3 - Alpha", "4 - Beta", "5 - Production/Stable", "6 - Mature", "7 - Inactive"]
lic = licenses[cfg["license"]]

def extra(name: str) -> list[str]: return shlex.split(cfg.get(f"{name}_requirements", ""))

setuptools.setup(
    name=cfg["lib_name"],
    license=lic[0],
    classifiers=[
        "Development Status :: " + statuses[int(cfg["status"])],
        "Intended Audience :: " + cfg["audience"].title(),
        "License :: " + lic[1],
        "Natural Language :: " + cfg["language"].title(),
        "Programming Language :: Python :: 3",
    ],
    url=cfg["git_url"],
    packages=setuptools.find_packages(include=["lora_kit", "lora_kit.*"]),
    package_data={"lora_kit": ["assets/**/*", "assets/*"]},
    include_package_data=True,
    install_requires=shlex.split(cfg.get("requirements", "")),
    # `pip install lora-kit`: the CLI and the package; [notebook]: the widget trainer and plots in Jupyter; [tensorboard]: --logging_dir;
    # [dev]: everything the tests and nbdev_test need (the two extras too)
    extras_require={"notebook": extra("notebook"), "tensorboard": extra("tensorboard"),
                    "dev": extra("dev") + extra("notebook") + extra("tensorboard")},
    python_requires=">=" + cfg["min_python"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    zip_safe=False,
    entry_points={
        "console_scripts": cfg.get("console_scripts", "").split(),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
    version=cfg["version"],
    description=cfg["description"],
    author=cfg["author"],
    author_email=cfg["author_email"],
)
