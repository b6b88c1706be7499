using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Models.Llama;

/// <summary>
/// Keys and values of past positions, per layer, for incremental decoding: <c>[batch, kv_heads, past, head_dim]</c>
/// after RoPE. Storage grows in chunks so each step writes in place instead of re-concatenating.
/// Dispose it when the sequence is done.
/// </summary>
public sealed class KvCache : IDisposable
{
    readonly Tensor?[] _keys, _values;
    const long Chunk = 256;

    public KvCache(int layers)
    {
        _keys = new Tensor?[layers];
        _values = new Tensor?[layers];
    }

    /// <summary>Positions already stored (the offset of the next token).</summary>
    public long Length { get; private set; }


    /// <summary>
    /// Appends this step's keys/values for <paramref name="layer"/> and returns views over all positions so far.
    /// Every layer appends the same number of positions; <see cref="Length"/> advances after the last layer.
    /// </summary>
    public (Tensor Keys, Tensor Values) Append(int layer, Tensor keys, Tensor values)
    {
        var added = keys.shape[2];
        var total = Length + added;
        _keys[layer] = Store(_keys[layer], keys, total);
        _values[layer] = Store(_values[layer], values, total);
        if (layer == _keys.Length - 1)
        {
            Length = total;
        }
        return (_keys[layer]!.narrow(2, 0, total), _values[layer]!.narrow(2, 0, total));
    }

    Tensor Store(Tensor? buffer, Tensor step, long total)
    {
        using var noGrad = torch.no_grad();
        if (buffer is null || buffer.shape[2] < total)
        {
            var capacity = (total + Chunk - 1) / Chunk * Chunk;
            var grown = torch.empty([step.shape[0], step.shape[1], capacity, step.shape[3]], dtype: step.dtype, device: step.device);
            if (buffer is not null && Length > 0)
                grown.narrow(2, 0, Length).copy_(buffer.narrow(2, 0, Length));
            buffer?.Dispose();
            buffer = grown.DetachFromDisposeScope();
        }
        buffer.narrow(2, Length, step.shape[2]).copy_(step);
        return buffer;
    }

    /// <summary>Forgets everything (keeps no memory).</summary>
    public void Clear()
    {
        for (int i = 0; i < _keys.Length; i++)
        {
            _keys[i]?.Dispose(); _keys[i] = null;
            _values[i]?.Dispose(); _values[i] = null;
        }
        Length = 0;
    }

    public void Dispose() => Clear();
}
