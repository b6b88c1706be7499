using System.Buffers.Binary;
using System.Text;
using System.Text.Json;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.IO;

public class SafetensorsRoundTripTests
{
    public static TheoryData<ScalarType> NativeTypes() =>
    [
        ScalarType.Float64, ScalarType.Float32, ScalarType.Float16, ScalarType.BFloat16, ScalarType.Int64,
        ScalarType.Int32, ScalarType.Int16, ScalarType.Int8, ScalarType.Byte, ScalarType.Bool,
    ];

    /// <summary>Random bytes viewed as the dtype (so NaN payloads, subnormals and extremes are covered).</summary>
    internal static Tensor RandomTensor(ScalarType dtype, long[] shape, int seed)
    {
        var t = empty(shape, dtype);
        var rng = new Random(seed);
        if (t.numel() > 0)
        {
            rng.NextBytes(t.bytes);
            if (dtype == ScalarType.Bool)
            {
                var b = t.bytes;
                for (int i = 0; i < b.Length; i++) b[i] &= 1;
            }
        }
        return t;
    }

    [Theory]
    [MemberData(nameof(NativeTypes))]
    public void Every_dtype_round_trips_bitwise(ScalarType dtype)
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        var tensors = new Dictionary<string, Tensor>
        {
            ["a.weight"] = RandomTensor(dtype, [3, 5, 2], 1),
            ["b"] = RandomTensor(dtype, [7], 2),
            ["scalar"] = RandomTensor(dtype, [], 3),
            ["empty"] = RandomTensor(dtype, [0, 4], 4),
        };
        var path = dir.File("x.safetensors");
        SafetensorsWriter.Write(path, tensors, new Dictionary<string, string> { ["format"] = "pt", ["ünïcode"] = "värde ✓" });
        using var file = SafetensorsFile.Open(path);
        Assert.Equal(tensors.Keys.Order(StringComparer.Ordinal), file.Keys);
        Assert.Equal("värde ✓", file.Metadata["ünïcode"]);
        foreach (var (key, expected) in tensors)
        {
            Assert.Equal(SafetensorsDType.NameOf(dtype), file.Info(key).DType);
            TensorAssert.BitwiseEqual(expected, file.Load(key), key);
            TensorAssert.BitwiseEqual(expected, file.Load(key), key); // loading twice gives a fresh equal tensor
        }
    }

    [Fact]
    public void Written_layout_matches_the_reference_library_widest_dtype_first_then_sorted_keys_space_padded_header()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        var path = dir.File("layout.safetensors");
        SafetensorsWriter.Write(path, new Dictionary<string, Tensor>
        {
            ["z"] = ones(3, dtype: ScalarType.Float16),
            ["b"] = ones(1, dtype: ScalarType.Float32),
            ["a"] = ones(2, dtype: ScalarType.Float32),
            ["i"] = ones(1, dtype: ScalarType.Int64),
            ["m"] = ones(1, dtype: ScalarType.Byte),
        });
        var bytes = File.ReadAllBytes(path);
        long n = BinaryPrimitives.ReadInt64LittleEndian(bytes);
        Assert.Equal(0, n % 8);
        var json = Encoding.UTF8.GetString(bytes, 8, (int)n);
        Assert.Equal(json.TrimEnd(' '), json.TrimEnd(' ').Trim());
        using var doc = JsonDocument.Parse(json);
        var order = doc.RootElement.EnumerateObject().Select(p => p.Name).ToArray();
        Assert.Equal(["i", "a", "b", "z", "m"], order);
        var offsets = order.Select(k => doc.RootElement.GetProperty(k).GetProperty("data_offsets")[0].GetInt64()).ToArray();
        Assert.Equal([0L, 8, 16, 20, 26], offsets);
        Assert.Equal(8 + n + 27, bytes.Length);
        Assert.Empty(Directory.GetFiles(dir.Path, "*.tmp", SearchOption.AllDirectories).Concat(Directory.GetFiles(dir.Path, ".*")));
    }

    [Fact]
    public void Writing_over_an_existing_file_replaces_it_and_a_failed_write_leaves_it_untouched()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        var path = dir.File("w.safetensors");
        SafetensorsWriter.Write(path, new Dictionary<string, Tensor> { ["x"] = ones(2) });
        SafetensorsWriter.Write(path, new Dictionary<string, Tensor> { ["y"] = zeros(3) });
        using (var f = SafetensorsFile.Open(path))
            Assert.Equal(["y"], f.Keys);
        var before = File.ReadAllBytes(path);
        var failing = new[] { new PendingTensor("bad", ScalarType.Float32, [2], () => throw new InvalidOperationException("producer failed")) };
        Assert.Throws<InvalidOperationException>(() => SafetensorsWriter.Write(path, failing));
        Assert.Equal(before, File.ReadAllBytes(path));
        Assert.Single(Directory.GetFiles(dir.Path));
    }

    [Fact]
    public void Lazy_pending_tensors_are_produced_one_at_a_time_and_shape_mismatch_is_refused()
    {
        using var dir = new TempDir();
        int produced = 0;
        var pending = Enumerable.Range(0, 4).Select(i => new PendingTensor($"t{i}", ScalarType.Float32, [2, 2], () =>
        {
            produced++;
            return full(2, 2, (float)i);
        })).ToList();
        SafetensorsWriter.Write(dir.File("lazy.safetensors"), pending);
        Assert.Equal(4, produced);
        using (var f = SafetensorsFile.Open(dir.File("lazy.safetensors")))
        using (var scope = NewDisposeScope())
            Assert.Equal(3f, f.Load("t3")[1, 1].item<float>());
        var wrong = new[] { new PendingTensor("w", ScalarType.Float32, [3], () => zeros(4)) };
        var e = Assert.Throws<LoraSharpException>(() => SafetensorsWriter.Write(dir.File("wrong.safetensors"), wrong));
        Assert.Equal("w", e.Key);
        Assert.Contains("shape", e.Message);
    }

    [Fact]
    public void Copying_a_source_through_the_writer_keeps_tensors_and_metadata()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        using var src = TensorFiles.Open(ReferenceData.PathOf("sd", "lora", "kohya_lora.safetensors"));
        SafetensorsWriter.Write(dir.File("copy.safetensors"), src);
        using var copy = SafetensorsFile.Open(dir.File("copy.safetensors"));
        Assert.Equal(src.Metadata, copy.Metadata);
        Assert.Equal(src.Keys.Order(StringComparer.Ordinal), copy.Keys.Order(StringComparer.Ordinal));
        foreach (var k in src.Keys)
            TensorAssert.BitwiseEqual(src.Load(k), copy.Load(k), k);
    }

    [Fact]
    public void Load_converts_dtype_when_asked()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        SafetensorsWriter.Write(dir.File("c.safetensors"), new Dictionary<string, Tensor> { ["h"] = tensor(new[] { 1.5f, -2f }).to_type(ScalarType.Float16) });
        using var f = SafetensorsFile.Open(dir.File("c.safetensors"));
        var t = f.Load("h", ScalarType.Float32, CPU);
        Assert.Equal(ScalarType.Float32, t.dtype);
        Assert.Equal(new[] { 1.5f, -2f }, t.data<float>().ToArray());
        var e = Assert.Throws<LoraSharpException>(() => f.Load("missing"));
        Assert.Equal("missing", e.Key);
    }

    /// <summary>Builds a safetensors file by hand (for dtypes TorchSharp cannot hold).</summary>
    internal static byte[] HandBuilt(string json, byte[] data)
    {
        var header = Encoding.UTF8.GetBytes(json);
        var file = new byte[8 + header.Length + data.Length];
        BinaryPrimitives.WriteInt64LittleEndian(file, header.Length);
        header.CopyTo(file, 8);
        data.CopyTo(file, 8 + header.Length);
        return file;
    }

    [Fact]
    public void Float8_e4m3_and_e5m2_decode_exactly_to_float32()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        // e4m3fn: 0x38 = 1.0, 0x40 = 2.0, 0xB8 = -1.0, 0x7E = 448 (max), 0x01 = 2^-9 (min subnormal), 0x7F = NaN
        // e5m2:   0x3C = 1.0, 0xC0 = -2.0, 0x7B = 57344 (max), 0x7C = +inf, 0x01 = 2^-16, 0x7D = NaN
        var path = dir.File("f8.safetensors");
        File.WriteAllBytes(path, HandBuilt(
            """{"a":{"dtype":"F8_E4M3","shape":[6],"data_offsets":[0,6]},"b":{"dtype":"F8_E5M2","shape":[2,3],"data_offsets":[6,12]}}""",
            [0x38, 0x40, 0xB8, 0x7E, 0x01, 0x7F, 0x3C, 0xC0, 0x7B, 0x7C, 0x01, 0x7D]));
        using var f = SafetensorsFile.Open(path);
        Assert.Equal("F8_E4M3", f.Info("a").DType);
        var a = f.Load("a").data<float>().ToArray();
        Assert.Equal(new[] { 1f, 2f, -1f, 448f, MathF.Pow(2, -9) }, a[..5]);
        Assert.True(float.IsNaN(a[5]));
        var b = f.Load("b");
        Assert.Equal(new long[] { 2, 3 }, b.shape);
        var bv = b.data<float>().ToArray();
        Assert.Equal(new[] { 1f, -2f, 57344f, float.PositiveInfinity, MathF.Pow(2, -16) }, bv[..5]);
        Assert.True(float.IsNaN(bv[5]));
        Assert.Equal(ScalarType.BFloat16, f.Load("a", ScalarType.BFloat16).dtype);
    }

    [Fact]
    public void Unsigned_16_32_64_bit_integers_widen_and_u64_above_int64_is_refused()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        var data = new byte[4 + 8 + 16];
        BinaryPrimitives.WriteUInt16LittleEndian(data, 65535);
        BinaryPrimitives.WriteUInt16LittleEndian(data.AsSpan(2), 7);
        BinaryPrimitives.WriteUInt32LittleEndian(data.AsSpan(4), uint.MaxValue);
        BinaryPrimitives.WriteUInt32LittleEndian(data.AsSpan(8), 9);
        BinaryPrimitives.WriteUInt64LittleEndian(data.AsSpan(12), long.MaxValue);
        BinaryPrimitives.WriteUInt64LittleEndian(data.AsSpan(20), ulong.MaxValue);
        var path = dir.File("u.safetensors");
        File.WriteAllBytes(path, HandBuilt(
            """{"u16":{"dtype":"U16","shape":[2],"data_offsets":[0,4]},"u32":{"dtype":"U32","shape":[2],"data_offsets":[4,12]},"u64":{"dtype":"U64","shape":[2],"data_offsets":[12,28]}}""",
            data));
        using var f = SafetensorsFile.Open(path);
        Assert.Equal(new[] { 65535, 7 }, f.Load("u16").data<int>().ToArray());
        Assert.Equal(new[] { (long)uint.MaxValue, 9 }, f.Load("u32").data<long>().ToArray());
        var e = Assert.Throws<LoraSharpException>(() => f.Load("u64"));
        Assert.Equal("u64", e.Key);
        Assert.Contains("element 1", e.Message);
    }

    [Fact]
    public void Opening_reads_only_the_header_and_loads_only_requested_tensors()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        var path = dir.File("big.safetensors");
        SafetensorsWriter.Write(path, new Dictionary<string, Tensor> { ["a"] = ones(1000), ["b"] = ones(1000) });
        // Destroy b's data: opening and loading a must still work (nothing but the header and a's bytes is read).
        var bytes = File.ReadAllBytes(path);
        using (var f = SafetensorsFile.Open(path))
        {
            long bOffset = f.DataOffset("b");
            for (long i = bOffset; i < bOffset + 4000; i++) bytes[i] = 0xFF;
        }
        File.WriteAllBytes(path, bytes);
        using var g = SafetensorsFile.Open(path);
        Assert.Equal(1000f, g.Load("a").sum().item<float>());
        Assert.True(float.IsNaN(g.Load("b")[0].item<float>()));
    }
}
