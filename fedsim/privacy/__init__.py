"""Stage 5, privacy: noise samplers, DP aggregators (mechanisms), DP events and the
accountant, and the canary audit.
"""
