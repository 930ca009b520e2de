"""Fuzz tests (hypothesis): every parser of untrusted bytes and every msgpack endpoint.

The only allowed outcomes are the project's own errors (``EStargzError`` subclasses,
``ProtocolError``, ``ApiError``): no other exception, no hang, no allocation out of
proportion to the input.  ``LAZYD_FUZZ_PROFILE=long`` (``scripts/fuzz``) runs 10,000
cases per target instead of the CI smoke run's 200.
"""
