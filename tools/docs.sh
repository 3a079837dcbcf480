#!/usr/bin/env bash
# Render the notebooks as lora_kit's documentation site, in _docs/ (open _docs/index.html).
#   pip install -c constraints.txt -e ".[dev]" && tools/docs.sh
# nbdev_docs renders with Quarto. PyPI's quarto-cli is a source package whose build downloads the Quarto binary from
# GitHub, so on a machine that reaches only package registries, install Quarto another way (a .deb from quarto.org,
# or conda-forge's `quarto`) and put it on PATH first; without it the script writes a plain HTML site with nbconvert
# (tools/docs_html.py: every notebook with its kept outputs, and an index in reading order).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v quarto >/dev/null && ! pip install -q quarto-cli; then
    echo "tools/docs.sh: no Quarto here (see the comment at the top); writing the plain HTML site instead" >&2
    python tools/docs_html.py; exit 0
fi
nbdev_docs
python tools/make_readme.py          # nbdev_docs rewrites README.md with nbdev_readme; the project's own generator wins
echo "documentation site: _docs/index.html"
