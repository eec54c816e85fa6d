"""Lets ``megatron.training`` (megatron-core 0.19) import on Python 3.11: it uses Python 3.12's
``typing.override``, a decorator that only marks methods. Imported for its effect by conftest in
the pytest process and by test modules whose spawned ranks import ``megatron.training``, since
those ranks never load conftest."""
import typing

if not hasattr(typing, "override"):
    typing.override = lambda f: f
