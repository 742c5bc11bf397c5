"""Complete verification: branch and bound (`verify`) and the exact MILP reference (`milp_verify`).

`verify` decides, for each input, whether a classifier is robust on an l-infinity or l2
ball around it, with lipnets' own bounds (CROWN, α-CROWN) and branch and bound over ReLU
phases (Note [Branch and bound] in `lipnets.verify.bab`); `milp_verify` solves the same
question exactly, as a mixed-integer linear program, for small ReLU networks and
l-infinity balls (`lipnets.verify.milp`), and is what `verify` is tested against.
"""

from lipnets.verify.bab import VerificationResult, verify
from lipnets.verify.milp import MILPResult, milp_verify

__all__ = ["MILPResult", "VerificationResult", "milp_verify", "verify"]
