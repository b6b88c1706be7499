using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.IO;

/// <summary>
/// A <c>.safetensors</c> file, memory-mapped: <see cref="Open"/> reads and validates only the header (milliseconds
/// for any file size), and <see cref="Load"/> copies one tensor's bytes from the mapping straight into a new
/// tensor's storage. Every structural rule of the format is checked on open (header length, UTF-8, JSON, duplicate
/// keys, dtypes, shapes vs byte sizes, offsets within the file, data regions contiguous with no overlap and no gap,
/// string-only metadata); a violation throws <see cref="LoraSharpException"/> naming the file, the key and the problem.
/// Dtypes TorchSharp lacks (F8_E4M3, F8_E5M2, U16, U32, U64) are converted on read, see <see cref="SafetensorsDType"/>.
/// Loads may run concurrently from several threads.
/// </summary>
public sealed class SafetensorsFile : ITensorSource
{
    /// <summary>The largest header accepted (the Python/Rust library's limit).</summary>
    public const long MaxHeaderBytes = 100_000_000;

    readonly FileBytes _file;
    readonly long _dataStart;
    readonly Dictionary<string, Entry> _entries;
    readonly string[] _keys;

    sealed record Entry(TensorInfo Info, long Begin, long End);

    public string FilePath { get; }
    public IReadOnlyList<string> Keys => _keys;
    public IReadOnlyDictionary<string, string> Metadata { get; }

    /// <summary>Length of the JSON header in bytes (after the 8-byte length prefix), padding included.</summary>
    public long HeaderLength { get; }

    /// <summary>Total file size in bytes.</summary>
    public long FileLength { get; }

    SafetensorsFile(string path, TensorReadMode mode)
    {
        FilePath = path;
        _file = new FileBytes(path, mode);
        FileLength = _file.Length;
        try
        {
            if (FileLength < 8)
                throw new LoraSharpException($"file is {FileLength} bytes, too short for a safetensors header (8-byte length prefix)", path);
            ulong headerLength = BinaryPrimitives.ReadUInt64LittleEndian(_file.ReadArray(0, 8));
            if (headerLength > MaxHeaderBytes)
                throw new LoraSharpException($"header length {headerLength} is over the {MaxHeaderBytes / 1_000_000} MB limit (not a safetensors file, or corrupted)", path);
            if ((long)headerLength > FileLength - 8)
                throw new LoraSharpException($"header length {headerLength} goes beyond the end of the file ({FileLength} bytes): truncated or not a safetensors file", path);
            HeaderLength = (long)headerLength;
            _dataStart = 8 + HeaderLength;
            var (entries, order, metadata) = ParseHeader(_file.ReadArray(8, (int)HeaderLength), path);
            ValidateLayout(entries, FileLength - _dataStart, path);
            _entries = entries;
            _keys = order.ToArray();
            Metadata = metadata;
        }
        catch
        {
            _file.Dispose();
            throw;
        }
    }

    /// <summary>Opens and validates a safetensors file; tensors are read only when loaded.</summary>
    public static SafetensorsFile Open(string path, TensorReadMode mode = TensorReadMode.MemoryMap) => new(Path.GetFullPath(path), mode);

    public bool Contains(string key) => _entries.ContainsKey(key);

    public TensorInfo Info(string key) => Get(key).Info;

    /// <summary>Offset of the tensor's first byte from the start of the file, for tools that need to locate raw data.</summary>
    public long DataOffset(string key) => _dataStart + Get(key).Begin;

    Entry Get(string key) =>
        _entries.TryGetValue(key, out var e) ? e : throw new LoraSharpException("no tensor with this key in the file", FilePath, key);

    public Tensor Load(string key, ScalarType? dtype = null, Device? device = null)
    {
        var e = Get(key);
        long start = _dataStart + e.Begin;
        var t = TensorFill.Read(e.Info.DType, e.Info.Shape, (pos, dst) => _file.Read(start + pos, dst), FilePath, key);
        return TensorFill.Convert(t, dtype, device);
    }

    /// <summary>Copies the raw stored bytes of one tensor into <paramref name="destination"/> (its length must be the tensor's byte length).</summary>
    public void ReadRaw(string key, Span<byte> destination)
    {
        var e = Get(key);
        if (destination.Length != e.End - e.Begin)
            throw new ArgumentException($"destination has {destination.Length} bytes, the tensor {e.End - e.Begin}");
        _file.Read(_dataStart + e.Begin, destination);
    }

    public void Dispose() => _file.Dispose();

    // ---- header parsing -------------------------------------------------------------------------------------

    static (Dictionary<string, Entry>, List<string>, Dictionary<string, string>) ParseHeader(ReadOnlySpan<byte> header, string path)
    {
        try
        {
            _ = new UTF8Encoding(false, throwOnInvalidBytes: true).GetCharCount(header);
        }
        catch (DecoderFallbackException e)
        {
            throw new LoraSharpException($"header is not valid UTF-8 (at byte {8 + e.Index})", path, inner: e);
        }

        var entries = new Dictionary<string, Entry>(StringComparer.Ordinal);
        var order = new List<string>();
        var metadata = new Dictionary<string, string>(StringComparer.Ordinal);
        bool sawMetadata = false;
        string? current = null;
        try
        {
            var reader = new Utf8JsonReader(header, new JsonReaderOptions { CommentHandling = JsonCommentHandling.Disallow, MaxDepth = 16 });
            if (!reader.Read() || reader.TokenType != JsonTokenType.StartObject)
                throw new LoraSharpException("header is not a JSON object", path);
            while (true)
            {
                Next(ref reader, path, null);
                if (reader.TokenType == JsonTokenType.EndObject)
                    break;
                string name = reader.GetString()!;
                current = name;
                if (name == "__metadata__")
                {
                    if (sawMetadata)
                        throw new LoraSharpException("duplicate key '__metadata__' in header", path, name);
                    sawMetadata = true;
                    ParseMetadata(ref reader, metadata, path);
                }
                else
                {
                    if (entries.ContainsKey(name))
                        throw new LoraSharpException("duplicate tensor key in header", path, name);
                    entries[name] = ParseEntry(ref reader, name, path);
                    order.Add(name);
                }
                current = null;
            }
            // Anything after the root object other than whitespace is an error (Utf8JsonReader enforces this on the next Read).
            if (reader.Read())
                throw new LoraSharpException("header has content after the JSON object", path);
        }
        catch (JsonException e)
        {
            throw new LoraSharpException($"header is not valid JSON: {e.Message}", path, current, e);
        }
        catch (InvalidOperationException e)
        {
            throw new LoraSharpException($"header is not valid JSON: {e.Message}", path, current, e);
        }
        return (entries, order, metadata);
    }

    static void Next(ref Utf8JsonReader reader, string path, string? key)
    {
        if (!reader.Read())
            throw new LoraSharpException("header JSON ends early", path, key);
    }

    static void ParseMetadata(ref Utf8JsonReader reader, Dictionary<string, string> metadata, string path)
    {
        Next(ref reader, path, "__metadata__");
        if (reader.TokenType == JsonTokenType.Null)
            return;
        if (reader.TokenType != JsonTokenType.StartObject)
            throw new LoraSharpException($"__metadata__ is a {Describe(reader.TokenType)}, expected an object of strings", path, "__metadata__");
        while (true)
        {
            Next(ref reader, path, "__metadata__");
            if (reader.TokenType == JsonTokenType.EndObject)
                return;
            string k = reader.GetString()!;
            Next(ref reader, path, k);
            if (reader.TokenType != JsonTokenType.String)
                throw new LoraSharpException($"metadata value is a {Describe(reader.TokenType)}, expected a string", path, "__metadata__." + k);
            if (!metadata.TryAdd(k, reader.GetString()!))
                throw new LoraSharpException("duplicate metadata key", path, "__metadata__." + k);
        }
    }

    static Entry ParseEntry(ref Utf8JsonReader reader, string key, string path)
    {
        Next(ref reader, path, key);
        if (reader.TokenType != JsonTokenType.StartObject)
            throw new LoraSharpException($"tensor entry is a {Describe(reader.TokenType)}, expected an object with dtype, shape and data_offsets", path, key);
        string? dtype = null;
        List<long>? shape = null;
        List<long>? offsets = null;
        while (true)
        {
            Next(ref reader, path, key);
            if (reader.TokenType == JsonTokenType.EndObject)
                break;
            string field = reader.GetString()!;
            Next(ref reader, path, key);
            switch (field)
            {
                case "dtype":
                    if (dtype is not null)
                        throw new LoraSharpException("duplicate field 'dtype'", path, key);
                    if (reader.TokenType != JsonTokenType.String)
                        throw new LoraSharpException($"dtype is a {Describe(reader.TokenType)}, expected a string", path, key);
                    dtype = reader.GetString()!;
                    break;
                case "shape":
                    if (shape is not null)
                        throw new LoraSharpException("duplicate field 'shape'", path, key);
                    shape = ReadIntArray(ref reader, path, key, "shape");
                    break;
                case "data_offsets":
                    if (offsets is not null)
                        throw new LoraSharpException("duplicate field 'data_offsets'", path, key);
                    offsets = ReadIntArray(ref reader, path, key, "data_offsets");
                    break;
                default:
                    reader.Skip(); // unknown fields are ignored, as the reference implementation does
                    break;
            }
        }
        if (dtype is null) throw new LoraSharpException("tensor entry has no 'dtype'", path, key);
        if (shape is null) throw new LoraSharpException("tensor entry has no 'shape'", path, key);
        if (offsets is null) throw new LoraSharpException("tensor entry has no 'data_offsets'", path, key);
        var size = SafetensorsDType.TryElementSize(dtype)
                   ?? throw new LoraSharpException($"unknown dtype '{dtype}' (known: F64, F32, F16, BF16, F8_E4M3, F8_E5M2, I64, I32, I16, I8, U64, U32, U16, U8, BOOL)", path, key);
        foreach (var d in shape)
            if (d < 0)
                throw new LoraSharpException($"negative dimension {d} in shape [{string.Join(", ", shape)}]", path, key);
        if (offsets.Count != 2)
            throw new LoraSharpException($"data_offsets has {offsets.Count} numbers, expected [begin, end]", path, key);
        long begin = offsets[0], end = offsets[1];
        if (begin < 0 || end < begin)
            throw new LoraSharpException($"data_offsets [{begin}, {end}] are invalid (need 0 <= begin <= end)", path, key);
        long bytes;
        try
        {
            bytes = checked(shape.Aggregate(1L, (a, b) => checked(a * b)) * size);
        }
        catch (OverflowException)
        {
            throw new LoraSharpException($"shape [{string.Join(", ", shape)}] is too large", path, key);
        }
        if (bytes != end - begin)
            throw new LoraSharpException(
                $"shape [{string.Join(", ", shape)}] of dtype {dtype} needs {bytes} bytes but data_offsets [{begin}, {end}] hold {end - begin}",
                path, key);
        return new Entry(new TensorInfo(key, dtype, shape.ToArray(), bytes), begin, end);
    }

    static List<long> ReadIntArray(ref Utf8JsonReader reader, string path, string key, string field)
    {
        if (reader.TokenType != JsonTokenType.StartArray)
            throw new LoraSharpException($"{field} is a {Describe(reader.TokenType)}, expected an array of integers", path, key);
        var list = new List<long>();
        while (true)
        {
            Next(ref reader, path, key);
            if (reader.TokenType == JsonTokenType.EndArray)
                return list;
            if (reader.TokenType != JsonTokenType.Number || !reader.TryGetInt64(out long v))
                throw new LoraSharpException($"{field} holds {Describe(reader.TokenType)} '{Encoding.UTF8.GetString(reader.ValueSpan)}', expected an integer", path, key);
            list.Add(v);
        }
    }

    static string Describe(JsonTokenType t) => t switch
    {
        JsonTokenType.StartObject => "object",
        JsonTokenType.StartArray => "array",
        JsonTokenType.String => "string",
        JsonTokenType.Number => "number",
        JsonTokenType.True or JsonTokenType.False => "boolean",
        JsonTokenType.Null => "null",
        _ => t.ToString(),
    };

    static void ValidateLayout(Dictionary<string, Entry> entries, long dataLength, string path)
    {
        foreach (var e in entries.Values)
            if (e.End > dataLength)
                throw new LoraSharpException(
                    $"data_offsets [{e.Begin}, {e.End}] go beyond the data section ({dataLength} bytes after the header): truncated file",
                    path, e.Info.Key);
        var sorted = entries.Values.OrderBy(e => e.Begin).ThenBy(e => e.End).ThenBy(e => e.Info.Key, StringComparer.Ordinal).ToList();
        long expected = 0;
        string? previous = null;
        foreach (var e in sorted)
        {
            if (e.Begin < expected)
                throw new LoraSharpException(
                    $"data_offsets [{e.Begin}, {e.End}] overlap the data of '{previous}' (which ends at {expected})", path, e.Info.Key);
            if (e.Begin > expected)
                throw new LoraSharpException(
                    $"data_offsets [{e.Begin}, {e.End}] leave a gap of {e.Begin - expected} bytes after {(previous is null ? "the header" : $"'{previous}'")} (data must be contiguous)",
                    path, e.Info.Key);
            if (e.End > e.Begin || previous is null)
                previous = e.Info.Key;
            expected = e.End;
        }
        if (expected != dataLength)
            throw new LoraSharpException(
                $"the tensors cover {expected} bytes of data but the file has {dataLength} bytes after the header ({dataLength - expected} unexplained trailing bytes)",
                path);
    }
}
