"""gearshift.operator: the InferenceService CRD, engine policy, manifest builders and kopf handlers.

Import it as `gearshift.operator` only: the folder's own name shadows the stdlib `operator`.
"""
