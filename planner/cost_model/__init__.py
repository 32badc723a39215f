"""The planner's cost model: what a call, a reallocation and a data transfer cost, from profiles.

Read in this order (each module's docstring has its formulas, each term a small named function):

- ``profile``:          the versioned JSON profiles (layer times per kind and tp degree, collective rates);
- ``analytic_profile``: the analytic H100 profile from datasheet rates (``python -m`` it to regenerate);
- ``collectives``:      alpha-beta ring formulas;
- ``shapes``:           pipeline stages, parameters per device, batch split;
- ``call_time``:        ``t_call`` — pipeline slots, tp/pp/dp communication, generation's decode steps;
- ``memory``:           ``mem`` (= ``call_memory``) and the executor's memory policy;
- ``realloc``:          reallocation from the layout algebra's plan (exact) and its fast estimate;
- ``transfer``:         bytes of the keys on a data edge and the transfer formula;
- ``tables``:           candidates per call and the flat tables the search runs on.
"""

from planner.cost_model.call_time import CallTime, t_call
from planner.cost_model.memory import CallMemory, usable_memory_bytes
from planner.cost_model.memory import call_memory as mem
from planner.cost_model.profile import Profile, default_profile, load_profile, profile_from_dict
from planner.cost_model.realloc import realloc_estimate_s, realloc_time_s
from planner.cost_model.shapes import ModelOptions

__all__ = ["CallTime", "t_call", "CallMemory", "mem", "usable_memory_bytes", "Profile", "default_profile",
           "load_profile", "profile_from_dict", "realloc_estimate_s", "realloc_time_s", "ModelOptions"]
