"""dsr1: get DeepSeek-R1 and its distills running on the hardware you have.

Nothing heavy is imported here: `dsr1 --help` and `dsr1 doctor` must start fast.
`dsr1.Deployer` (docs/python.md) is imported on first use.
"""

__version__ = "0.1.0"
__all__ = ["Deployer", "__version__"]


def __getattr__(name: str):
    if name == "Deployer":
        from dsr1.api import Deployer

        return Deployer
    raise AttributeError(f"module 'dsr1' has no attribute {name!r}")
