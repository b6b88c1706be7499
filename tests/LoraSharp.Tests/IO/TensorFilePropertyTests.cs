using CsCheck;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.IO;

/// <summary>Property tests: random tensor sets round-trip bitwise; random damage to files never escapes as anything but LoraSharpException.</summary>
public class TensorFilePropertyTests
{
    static readonly ScalarType[] Types =
    [
        ScalarType.Float64, ScalarType.Float32, ScalarType.Float16, ScalarType.BFloat16, ScalarType.Int64,
        ScalarType.Int32, ScalarType.Int16, ScalarType.Int8, ScalarType.Byte, ScalarType.Bool,
    ];

    const string KeyChars = "abcdefghijklmnopqrstuvwxyz0123456789._-";
    const string TextChars = "abc XYZ 019 _.,:;{}[]\"\\/\n\t é✓日本語🙂";

    static string RandomText(Random r, string chars, int min, int max)
    {
        int n = r.Next(min, max + 1);
        var sb = new System.Text.StringBuilder();
        while (sb.Length < n)
        {
            int i = r.Next(chars.Length);
            if (char.IsHighSurrogate(chars[i]) && i + 1 < chars.Length) sb.Append(chars, i, 2);
            else if (!char.IsLowSurrogate(chars[i])) sb.Append(chars[i]);
        }
        return sb.ToString();
    }

    sealed record Spec(string Key, ScalarType DType, long[] Shape, int Seed);

    static readonly Gen<(Spec[] Tensors, KeyValuePair<string, string>[] Metadata)> FileGen =
        Gen.Select(Gen.Int[0, 8], Gen.Int[0, 5], Gen.Int, (count, metaCount, seed) =>
        {
            var r = new Random(seed);
            var keys = new HashSet<string>();
            var specs = new List<Spec>();
            while (specs.Count < count)
            {
                var key = RandomText(r, KeyChars, 1, 24);
                if (!keys.Add(key)) continue;
                var shape = Enumerable.Range(0, r.Next(0, 5)).Select(_ => (long)r.Next(0, 6)).ToArray();
                specs.Add(new Spec(key, Types[r.Next(Types.Length)], shape, r.Next()));
            }
            var meta = new Dictionary<string, string>();
            for (int i = 0; i < metaCount; i++) meta[RandomText(r, TextChars, 0, 10)] = RandomText(r, TextChars, 0, 40);
            return (specs.ToArray(), meta.ToArray());
        });

    [Fact]
    public void Random_shapes_dtypes_and_metadata_round_trip_bitwise_through_safetensors_and_ckpt()
    {
        using var dir = new TempDir();
        int n = 0;
        FileGen.Sample(sample =>
        {
            using var scope = NewDisposeScope();
            var tensors = sample.Tensors.ToDictionary(s => s.Key, s => SafetensorsRoundTripTests.RandomTensor(s.DType, s.Shape, s.Seed));
            var metadata = sample.Metadata.ToDictionary(kv => kv.Key, kv => kv.Value);
            var st = dir.File($"p{n}.safetensors");
            var ckpt = dir.File($"p{n++}.ckpt");
            SafetensorsWriter.Write(st, tensors, metadata);
            TorchCheckpointWriter.Write(ckpt, tensors);
            using var a = TensorFiles.Open(st);
            using var b = TensorFiles.Open(ckpt);
            Assert.Equal(metadata.OrderBy(k => k.Key, StringComparer.Ordinal), a.Metadata.OrderBy(k => k.Key, StringComparer.Ordinal));
            Assert.Equal(tensors.Keys.Order(StringComparer.Ordinal), a.Keys.Order(StringComparer.Ordinal));
            Assert.Equal(tensors.Keys, b.Keys);
            foreach (var (key, t) in tensors)
            {
                Assert.Equal(t.shape, a.Info(key).Shape);
                TensorAssert.BitwiseEqual(t, a.Load(key), key);
                TensorAssert.BitwiseEqual(t, b.Load(key), key);
            }
        }, iter: 60);
    }

    /// <summary>Opens and loads everything; any failure must be a LoraSharpException.</summary>
    static void OpenAndLoadAll(string path)
    {
        try
        {
            using var f = TensorFiles.Open(path);
            foreach (var k in f.Keys)
            {
                using var scope = NewDisposeScope();
                f.Load(k);
            }
        }
        catch (LoraSharpException)
        {
        }
    }

    static readonly Gen<(int Seed, int Flips, bool Truncate)> DamageGen = Gen.Select(Gen.Int, Gen.Int[1, 8], Gen.Bool);

    static void Damage(byte[] good, string path, (int Seed, int Flips, bool Truncate) d, int focusStart, int focusLength)
    {
        var r = new Random(d.Seed);
        var bytes = (byte[])good.Clone();
        for (int i = 0; i < d.Flips; i++)
            bytes[focusStart + r.Next(focusLength)] = (byte)r.Next(256);
        if (d.Truncate)
            bytes = bytes[..r.Next(bytes.Length)];
        File.WriteAllBytes(path, bytes);
    }

    [Fact]
    public void Damaged_safetensors_files_fail_only_with_LoraSharpException()
    {
        using var dir = new TempDir();
        using (var scope = NewDisposeScope())
            SafetensorsWriter.Write(dir.File("good.safetensors"),
                new Dictionary<string, Tensor> { ["a"] = ones(3, 4), ["b.c"] = zeros(5, dtype: ScalarType.Int64) },
                new Dictionary<string, string> { ["k"] = "v" });
        var good = File.ReadAllBytes(dir.File("good.safetensors"));
        int headerEnd = 8 + (int)BitConverter.ToInt64(good);
        DamageGen.Sample(d =>
        {
            var path = dir.File("bad.safetensors");
            Damage(good, path, d, 0, headerEnd); // damage the length prefix and the header
            OpenAndLoadAll(path);
        }, iter: 300, threads: 1);
    }

    [Fact]
    public void Damaged_pickle_checkpoints_fail_only_with_LoraSharpException()
    {
        using var dir = new TempDir();
        var good = File.ReadAllBytes(ReferenceData.PathOf("sd", "model", "tiny_sd15.ckpt"));
        // data.pkl is the first zip entry torch writes: damage the first 64 KiB (local header + pickle) and the zip directory at the end.
        DamageGen.Sample(d =>
        {
            var path = dir.File("bad.ckpt");
            if (d.Seed % 2 == 0)
                Damage(good, path, d, 0, 64 * 1024);
            else
                Damage(good, path, d, good.Length - 8192, 8192);
            OpenAndLoadAll(path);
        }, iter: 150, threads: 1);
    }
}
