"""The held chats greedy fidelity is checked on (tests/test_model_fidelity.py against transformers,
tests/test_quant_int4.py against fp32 and llama.cpp): one list, so both judge the same prompts."""

NEW_TOKENS = 48
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write a haiku about the sea."}],
    [{"role": "system", "content": "You answer in one short sentence."},
     {"role": "user", "content": "Why is the sky blue? Explain like I'm five."}],
    [{"role": "user", "content": "List three uses of a bicycle."}],
    [{"role": "user", "content": "Explain what a prime number is."}],
]
