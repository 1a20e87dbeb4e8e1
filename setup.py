# Shim so that older pip and `python setup.py` work; all metadata lives in setup.cfg.
from setuptools import setup

setup()
