"""Workflows that chain cpsl commands into one result: ``cpsl recipe mosi`` (:mod:`cpsl.recipes.mosi`)."""
