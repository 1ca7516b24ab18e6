"""Profiles shipped with autotune (installed as the package ``autotune.shipped_profiles``).

Only the ``*.yaml`` files here are profiles; this file makes the directory a
package so that ``importlib.resources`` finds it in a wheel as in a checkout.
"""
