using System.Text.Json;
using LoraSharp.IO;
using static TorchSharp.torch;

namespace LoraSharp.Models.StableDiffusion;

/// <summary>
/// The shards of a Hugging Face / diffusers sharded checkpoint (<c>*.safetensors.index.json</c>: <c>weight_map</c> key →
/// shard file) seen as one tensor source. Shards are opened lazily; every key of the map must be in its shard.
/// </summary>
public sealed class ShardedTensorSource : ITensorSource
{
    readonly Dictionary<string, string> _shardOf;
    readonly Dictionary<string, ITensorSource> _open = new(StringComparer.Ordinal);
    readonly string _folder;

    public string FilePath { get; }
    public IReadOnlyList<string> Keys { get; }
    public IReadOnlyDictionary<string, string> Metadata { get; }

    ShardedTensorSource(string indexPath, Dictionary<string, string> shardOf, IReadOnlyDictionary<string, string> metadata)
    {
        FilePath = indexPath;
        _folder = Path.GetDirectoryName(indexPath)!;
        _shardOf = shardOf;
        Keys = shardOf.Keys.ToArray();
        Metadata = metadata;
    }

    /// <summary>Reads the index; throws <see cref="LoraSharpException"/> for a malformed index or a missing shard file.</summary>
    public static ShardedTensorSource Open(string indexPath)
    {
        indexPath = Path.GetFullPath(indexPath);
        using var doc = DiffusersJson.Parse(indexPath);
        if (!doc.RootElement.TryGetProperty("weight_map", out var map) || map.ValueKind != JsonValueKind.Object)
            throw new LoraSharpException("sharded checkpoint index has no weight_map object", indexPath, "weight_map");
        var shardOf = new Dictionary<string, string>(StringComparer.Ordinal);
        foreach (var entry in map.EnumerateObject())
        {
            var shard = entry.Value.GetString();
            if (string.IsNullOrEmpty(shard) || shard.Contains('/') || shard.Contains('\\') || shard.Contains(".."))
                throw new LoraSharpException($"shard name '{shard}' must be a file name in the index's folder", indexPath, entry.Name);
            shardOf[entry.Name] = shard;
        }
        foreach (var shard in shardOf.Values.Distinct())
            if (!File.Exists(Path.Combine(Path.GetDirectoryName(indexPath)!, shard)))
                throw new LoraSharpException($"shard file '{shard}' listed in the index does not exist", indexPath);
        var metadata = new Dictionary<string, string>();
        if (doc.RootElement.TryGetProperty("metadata", out var meta) && meta.ValueKind == JsonValueKind.Object)
            foreach (var m in meta.EnumerateObject())
                metadata[m.Name] = m.Value.ToString();
        return new ShardedTensorSource(indexPath, shardOf, metadata);
    }

    ITensorSource Shard(string key)
    {
        if (!_shardOf.TryGetValue(key, out var shard))
            throw new LoraSharpException("no such tensor in the sharded checkpoint", FilePath, key);
        if (!_open.TryGetValue(shard, out var source))
        {
            source = TensorFiles.Open(Path.Combine(_folder, shard));
            _open[shard] = source;
        }
        if (!source.Contains(key))
            throw new LoraSharpException($"the index puts this tensor in '{shard}', which does not hold it", FilePath, key);
        return source;
    }

    public TensorInfo Info(string key) => Shard(key).Info(key);
    public bool Contains(string key) => _shardOf.ContainsKey(key);
    public Tensor Load(string key, ScalarType? dtype = null, Device? device = null) => Shard(key).Load(key, dtype, device);

    public void Dispose()
    {
        foreach (var s in _open.Values) s.Dispose();
        _open.Clear();
    }
}
