"""dsr1: get DeepSeek-R1 and its distills running on the hardware you have.

Nothing heavy is imported here: `dsr1 --help` and `dsr1 doctor` must start fast.
"""

__version__ = "0.1.0"
