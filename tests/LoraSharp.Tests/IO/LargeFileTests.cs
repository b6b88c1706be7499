using System.Diagnostics;
using System.Text;
using LoraSharp.IO;
using LoraSharp.Tests.Infrastructure;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.IO;

public class LargeFileTests
{
    [Fact]
    public void Opening_a_multi_gigabyte_file_reads_only_the_header_and_loads_one_tensor_without_the_rest()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        const long big = 3_000_000_000;
        var header = Encoding.UTF8.GetBytes(
            $"{{\"big\":{{\"dtype\":\"U8\",\"shape\":[{big}],\"data_offsets\":[0,{big}]}},\"small\":{{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[{big},{big + 8}]}}}}");
        var path = dir.File("sparse.safetensors");
        using (var fs = new FileStream(path, FileMode.CreateNew))
        {
            fs.Write(BitConverter.GetBytes((long)header.Length));
            fs.Write(header);
            fs.SetLength(8 + header.Length + big + 8); // sparse: nothing of the 3 GB is on disk
            fs.Position = 8 + header.Length + big;
            fs.Write(BitConverter.GetBytes(1.5f));
            fs.Write(BitConverter.GetBytes(-3f));
        }
        var sw = Stopwatch.StartNew();
        using var f = TensorFiles.Open(path);
        Assert.True(sw.ElapsedMilliseconds < 1000, $"open took {sw.ElapsedMilliseconds} ms");
        Assert.Equal(new[] { big }, f.Info("big").Shape);
        Assert.Equal(new[] { 1.5f, -3f }, f.Load("small").data<float>().ToArray());
    }

    [Fact]
    public void Tensors_are_read_and_written_correctly_across_chunk_boundaries()
    {
        using var dir = new TempDir();
        using var scope = NewDisposeScope();
        long saved = TensorFill.ChunkBytes;
        try
        {
            TensorFill.ChunkBytes = 24; // force many pieces, and a partial last one, for every tensor below
            var tensors = new Dictionary<string, Tensor>
            {
                ["bf16"] = SafetensorsRoundTripTests.RandomTensor(ScalarType.BFloat16, [7, 5], 1),
                ["f64"] = SafetensorsRoundTripTests.RandomTensor(ScalarType.Float64, [13], 2),
                ["u8"] = SafetensorsRoundTripTests.RandomTensor(ScalarType.Byte, [101], 3),
            };
            SafetensorsWriter.Write(dir.File("c.safetensors"), tensors);
            TorchCheckpointWriter.Write(dir.File("c.ckpt"), tensors);
            foreach (var mode in new[] { TensorReadMode.MemoryMap, TensorReadMode.PositionalRead })
            {
                using var a = TensorFiles.Open(dir.File("c.safetensors"), mode);
                using var b = TensorFiles.Open(dir.File("c.ckpt"), mode);
                foreach (var (k, t) in tensors)
                {
                    TensorAssert.BitwiseEqual(t, a.Load(k), k);
                    TensorAssert.BitwiseEqual(t, b.Load(k), k);
                }
            }
        }
        finally
        {
            TensorFill.ChunkBytes = saved;
        }
    }
}
