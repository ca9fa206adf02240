"""safetensors.torch.save_file, written with tests/reference/st.py (see __init__.py)."""
import st


def save_file(tensors, filename, metadata=None):
    seen = {}
    for name, t in tensors.items():
        if not t.is_contiguous():
            raise ValueError(f"You are trying to save a non contiguous tensor: `{name}`")
        ptr = t.data_ptr()
        if t.numel() and ptr in seen:
            raise RuntimeError(f"Some tensors share memory: {seen[ptr]} and {name}")
        seen[ptr] = name
    st.save(filename, tensors, metadata)
