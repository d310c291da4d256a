"""The request pipeline above both engines (vLLM's shape): input processing (chat templates, tools,
output formats compiled to grammars), the engine core (token ids in, token ids out), output processing
(tool-call parsing, response assembly). Plain dataclass contracts between the stages.
"""
