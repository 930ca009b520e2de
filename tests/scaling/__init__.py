"""Tests of lazyd beyond one node: nodes sharing a pull-through mirror."""
