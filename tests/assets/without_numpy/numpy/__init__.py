# Put this folder first on PYTHONPATH to run as if numpy were not installed (sp_rope does not
# declare it): torch then reports "Numpy is not available" wherever something still needs it.
raise ModuleNotFoundError("numpy is blocked by tests/assets/without_numpy (sp_rope must not need it)")
