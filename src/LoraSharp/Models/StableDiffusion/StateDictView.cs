using LoraSharp.IO;
using static TorchSharp.torch;

namespace LoraSharp.Models.StableDiffusion;

/// <summary>
/// A view of a tensor source without a common key prefix: ldm <c>.ckpt</c> files are <c>torch.save({"state_dict": sd})</c>,
/// whose keys read <c>state_dict.model.diffusion_model.…</c>. Keys outside the prefix (e.g. <c>global_step</c>) are not
/// tensors the model needs and are hidden. Disposing the view disposes the underlying source.
/// </summary>
public sealed class StateDictView : ITensorSource
{
    readonly ITensorSource _inner;
    readonly string _prefix;
    readonly string[] _keys;
    readonly bool _ownsInner;

    StateDictView(ITensorSource inner, string prefix, bool ownsInner)
    {
        _inner = inner;
        _ownsInner = ownsInner;
        _prefix = prefix;
        _keys = inner.Keys.Where(k => k.StartsWith(prefix, StringComparison.Ordinal)).Select(k => k[prefix.Length..]).ToArray();
    }

    /// <summary>The source itself, or a view without <c>state_dict.</c> when its tensors live under that key.</summary>
    /// <param name="ownsInner">Whether disposing the view disposes <paramref name="source"/>.</param>
    public static ITensorSource Unwrap(ITensorSource source, bool ownsInner = true)
    {
        if (source is StateDictView) return source;
        const string prefix = "state_dict.";
        int under = source.Keys.Count(k => k.StartsWith(prefix, StringComparison.Ordinal));
        return under > 0 && under >= source.Keys.Count / 2 ? new StateDictView(source, prefix, ownsInner) : source;
    }

    public string FilePath => _inner.FilePath;
    public IReadOnlyList<string> Keys => _keys;
    public IReadOnlyDictionary<string, string> Metadata => _inner.Metadata;
    public TensorInfo Info(string key) => _inner.Info(_prefix + key) with { Key = key };
    public bool Contains(string key) => _inner.Contains(_prefix + key);
    public Tensor Load(string key, ScalarType? dtype = null, Device? device = null) => _inner.Load(_prefix + key, dtype, device);
    public void Dispose()
    {
        if (_ownsInner) _inner.Dispose();
    }
}
