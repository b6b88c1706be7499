using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.IO;

/// <summary>Every tensor file of the reference set opens and every tensor loads with the shape and dtype its header declares.</summary>
public class ReferenceFileTests
{
    public static TheoryData<string> ReferenceFiles()
    {
        var data = new TheoryData<string>();
        if (!Directory.Exists(ReferenceData.Root))
            throw new DirectoryNotFoundException($"Reference data missing: {ReferenceData.Root} (set LORASHARP_REFERENCE_DIR)");
        foreach (var f in Directory.EnumerateFiles(ReferenceData.Root, "*", SearchOption.AllDirectories)
                     .Where(f => f.EndsWith(".safetensors", StringComparison.Ordinal) || f.EndsWith(".ckpt", StringComparison.Ordinal))
                     .Order(StringComparer.Ordinal))
            data.Add(Path.GetRelativePath(ReferenceData.Root, f));
        return data;
    }

    [Theory]
    [MemberData(nameof(ReferenceFiles))]
    public void Every_tensor_of_a_reference_file_loads_with_its_declared_shape_and_dtype(string relativePath)
    {
        using var file = TensorFiles.Open(ReferenceData.PathOf(relativePath));
        Assert.NotEmpty(file.Keys);
        foreach (var key in file.Keys)
        {
            using var scope = NewDisposeScope();
            var info = file.Info(key);
            var t = file.Load(key);
            Assert.Equal(info.Shape, t.shape);
            Assert.Equal(SafetensorsDType.LoadedType(info.DType), t.dtype);
            Assert.True(t.is_contiguous());
        }
    }

    [Fact]
    public void Tiny_sd15_ckpt_holds_the_same_tensors_as_the_safetensors_copy()
    {
        using var st = TensorFiles.Open(ReferenceData.PathOf("sd", "model", "tiny_sd15.safetensors"));
        using var ckpt = TensorFiles.Open(ReferenceData.PathOf("sd", "model", "tiny_sd15.ckpt"));
        Assert.IsType<SafetensorsFile>(st);
        Assert.IsType<PickleCheckpoint>(ckpt);
        Assert.Equal(st.Keys.Count, ckpt.Keys.Count);
        foreach (var key in st.Keys)
        {
            using var scope = NewDisposeScope();
            var ckptKey = "state_dict." + key;
            Assert.True(ckpt.Contains(ckptKey), $"ckpt lacks {ckptKey}");
            Assert.Equal(st.Info(key).DType, ckpt.Info(ckptKey).DType);
            var a = st.Load(key);
            var b = ckpt.Load(ckptKey);
            Assert.Equal(a.shape, b.shape);
            Assert.Equal(a.dtype, b.dtype);
            TensorAssert.BitwiseEqual(a, b, key);
        }
    }

    [Fact]
    public void Ckpt_opens_with_positional_reads_as_well_as_memory_mapping()
    {
        using var mapped = PickleCheckpoint.Open(ReferenceData.PathOf("sd", "model", "tiny_sd15.ckpt"));
        using var pread = PickleCheckpoint.Open(ReferenceData.PathOf("sd", "model", "tiny_sd15.ckpt"), TensorReadMode.PositionalRead);
        foreach (var key in mapped.Keys.Take(40))
        {
            using var scope = NewDisposeScope();
            TensorAssert.BitwiseEqual(mapped.Load(key), pread.Load(key), key);
        }
    }
}
