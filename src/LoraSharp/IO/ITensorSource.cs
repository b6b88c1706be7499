using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.IO;

/// <summary>
/// A file of named tensors, opened lazily: the keys, shapes and dtypes are known after opening, and each tensor
/// is read from the file only when <see cref="Load"/> asks for it. Dispose to release the file.
/// </summary>
public interface ITensorSource : IDisposable
{
    /// <summary>The file this source reads.</summary>
    string FilePath { get; }

    /// <summary>All tensor keys, in file order (safetensors: header order; pickle: the order torch.save wrote).</summary>
    IReadOnlyList<string> Keys { get; }

    /// <summary>String metadata: safetensors' <c>__metadata__</c>; for pickle checkpoints, the primitive (non-tensor) values, flattened.</summary>
    IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Dtype (safetensors name), shape and stored byte length of one tensor; throws <see cref="LoraSharpException"/> for an unknown key.</summary>
    TensorInfo Info(string key);

    bool Contains(string key);

    /// <summary>
    /// Reads one tensor into a new, contiguous tensor owned by the caller (it lives in the current dispose scope).
    /// <paramref name="dtype"/> and <paramref name="device"/> convert when given; otherwise the file's dtype
    /// (see <see cref="SafetensorsDType.LoadedType"/> for the types TorchSharp lacks) on the CPU.
    /// </summary>
    Tensor Load(string key, ScalarType? dtype = null, Device? device = null);
}

/// <summary>What a file says about one tensor. <paramref name="DType"/> is the safetensors dtype name ("F32", "BF16", "F8_E4M3", ...).</summary>
public sealed record TensorInfo(string Key, string DType, long[] Shape, long ByteLength)
{
    public long ElementCount => Shape.Aggregate(1L, (a, b) => a * b);

    public override string ToString() => $"{Key} {DType} [{string.Join(", ", Shape)}]";
}
