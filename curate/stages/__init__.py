"""Stages: callable classes and functions that Ray Data runs over batches of rows.

They do not import ray; :mod:`curate.pipeline` composes them with Ray Data, so the
same code runs in a plain unit test.
"""
