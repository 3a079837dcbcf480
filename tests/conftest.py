import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # lora_kit never downloads; tests prove it
os.environ.setdefault("OMP_NUM_THREADS", "1")       # one thread: runs a test compares are bit-for-bit repeatable

import pytest


def pytest_addoption(parser):
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (minutes, system tools such as Chromium)")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs minutes or system tools (e.g. Chromium); skipped unless --run-slow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run-slow"): return
    for item in items:
        if "slow" in item.keywords: item.add_marker(pytest.mark.skip(reason="slow: run with --run-slow"))
