import os
os.environ.setdefault("HF_HUB_OFFLINE", "1")        # lora_kit never downloads; tests prove it
