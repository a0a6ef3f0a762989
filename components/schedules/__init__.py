"""Training timestep distributions p(t) and the time-shift map."""
from selfflow.components.schedules.timesteps import (
    LogitNormalTime,
    ShiftedTime,
    TimeDistribution,
    UniformTime,
    shift_time,
    shift_time_inverse,
)

__all__ = [
    "LogitNormalTime",
    "ShiftedTime",
    "TimeDistribution",
    "UniformTime",
    "shift_time",
    "shift_time_inverse",
]
