using System.Diagnostics;
using LoraSharp.Quantization;
using LoraSharp.Tests.Training.LlmTraining;
using LoraSharp.Training.Llm;
using TorchSharp;
using static TorchSharp.torch;
using Xunit.Abstractions;

namespace LoraSharp.Tests.Quantization;

public class Nf4Tests(ITestOutputHelper output)
{
    [Fact]
    public void Quantize_one_block_matches_hand_computed_codes_and_values()
    {
        // absmax 2 → normalized values 0.25, −0.5, 1, 0.04, −0.2, 0.6, −1, 0.1 (padded with zeros to the 64-value block).
        var values = new float[64];
        float[] head = [0.5f, -1.0f, 2.0f, 0.08f, -0.4f, 1.2f, -2.0f, 0.2f];
        head.CopyTo(values, 0);
        var q = Nf4.Quantize(values, [64]);
        // Nearest levels: 0.25→0.2461(10), −0.5→−0.5251(2), 1→1(15), 0.04→0.0796? no: midpoint 0.0398 < 0.04 → 8,
        // −0.2→−0.1848(5), 0.6→0.5626(13), −1→−1(0), 0.1→0.0796(8); zeros → 7.
        byte[] expectedCodes = [10, 2, 15, 8, 5, 13, 0, 8];
        for (int i = 0; i < 8; i += 2)
            Assert.Equal((byte)(expectedCodes[i] << 4 | expectedCodes[i + 1]), q.Packed[i / 2]);
        Assert.Equal(0x77, q.Packed[10]);
        // One block: the mean is the absmax itself, so double quantization is exact.
        Assert.Equal(2.0f, q.BlockAbsmax(0));
        var back = Nf4.Dequantize(q);
        for (int i = 0; i < 8; i++) Assert.Equal(Nf4.Code[expectedCodes[i]] * 2.0f, back[i]);
        Assert.Equal(0f, back[20]);
        Assert.Equal(32 + 1 + 4 + 4, q.StorageBytes);
    }

    [Fact]
    public void Double_quantized_absmax_is_within_the_dynamic_code_resolution()
    {
        var rng = new Random(1);
        int blocks = 1000;
        var values = new float[blocks * 64];
        for (int b = 0; b < blocks; b++)
        {
            float scale = (float)(0.01 + rng.NextDouble());
            for (int i = 0; i < 64; i++) values[b * 64 + i] = (float)(rng.NextDouble() * 2 - 1) * scale;
        }
        var q = Nf4.Quantize(values, [blocks, 64]);
        Assert.Equal((blocks + 255) / 256, q.AbsmaxScales.Length);
        for (int b = 0; b < blocks; b++)
        {
            float exact = 0;
            for (int i = 0; i < 64; i++) exact = Math.Max(exact, Math.Abs(values[b * 64 + i]));
            // centred values lie in [−0.5, 0.5]·group scale; the dynamic code's spacing there is ≤ 1/63 of the range
            Assert.True(Math.Abs(q.BlockAbsmax(b) - exact) <= 0.02 * q.AbsmaxScales[b / 256] + 1e-6, $"block {b}: {q.BlockAbsmax(b)} vs {exact}");
        }
    }

    [Fact]
    public void Vectorized_dequantization_equals_the_scalar_definition_in_float32_and_bfloat16()
    {
        var rng = new Random(2);
        var values = Enumerable.Range(0, 64 * 517 + 10).Select(_ => (float)(rng.NextDouble() * 4 - 2)).ToArray();
        var q = Nf4.Quantize(values, [values.Length]);
        var fast = Nf4.Dequantize(q);
        for (int i = 0; i < values.Length; i++)
        {
            byte v = q.Packed[i >> 1];
            int code = (i & 1) == 0 ? v >> 4 : v & 15;
            Assert.Equal(Nf4.Code[code] * q.BlockAbsmax(i / 64), fast[i]);
        }
        var bf = new ushort[values.Length];
        Nf4.DequantizeBf16(q, bf);
        using var reference = torch.tensor(fast).to_type(ScalarType.BFloat16);
        var refBits = System.Runtime.InteropServices.MemoryMarshal.Cast<byte, ushort>(reference.bytes).ToArray();
        Assert.Equal(refBits, bf);
    }

    [Fact]
    public void Dequantization_throughput_is_measured()
    {
        var values = new float[4096 * 1024];
        var rng = new Random(3);
        for (int i = 0; i < values.Length; i++) values[i] = (float)(rng.NextDouble() - 0.5);
        var q = Nf4.Quantize(values, [4096, 1024]);
        var dst = new float[values.Length];
        Nf4.Dequantize(q, dst);
        var sw = Stopwatch.StartNew();
        int reps = 5;
        for (int r = 0; r < reps; r++) Nf4.Dequantize(q, dst);
        double gbps = reps * values.Length * 4.0 / sw.Elapsed.TotalSeconds / 1e9;
        output.WriteLine($"NF4 → float32 dequantization: {gbps:F2} GB/s of output ({values.Length / 1e6:F1}M values)");
        Assert.True(gbps > 0.05);
    }

    [Fact]
    public void Quantized_llama_stores_about_half_a_byte_per_linear_parameter()
    {
        using var model = LlmModelLoader.Load(LlmTestModels.ReferenceModel, ScalarType.Float32, quantize: true);
        var q = model.Quantized!;
        Assert.Equal(14, q.Paths.Count);
        double perParam = q.StorageBytes / (double)q.QuantizedParameters;
        output.WriteLine($"NF4 linears: {q.StorageBytes} bytes for {q.QuantizedParameters} parameters = {perParam:F4} B/param; whole model {model.WeightBytes} bytes / {model.ParameterCount} = {model.WeightBytes / (double)model.ParameterCount:F3} B/param (embeddings, lm_head, norms fp32)");
        // 4 bits + 8 bits per 64 + 32 bits per 64·256, plus the fp32 mean and partial groups in this small model.
        Assert.InRange(perParam, 0.515, 0.53);
    }

    [Fact]
    public void Nf4_linear_forward_and_adapter_gradients_equal_a_plain_model_with_the_dequantized_weights()
    {
        using var quant = LlmModelLoader.Load(LlmTestModels.ReferenceModel, ScalarType.Float32, quantize: true);
        using var plain = Models.Llama.LlamaCheckpoint.Load(LlmTestModels.ReferenceModel);
        using (torch.no_grad())
            foreach (var path in quant.Quantized!.Paths)
            {
                var lin = plain.LinearModules().First(l => l.Path == path).Module;
                using var deq = quant.Quantized.Dequantize(path);
                lin.weight!.copy_(deq);
            }
        var grads = new List<Dictionary<string, float[]>>();
        foreach (var model in new[] { quant.Model, plain })
        {
            torch.manual_seed(5);
            using var host = new LoraSharp.Adapters.AdapterHost(model);
            host.FreezeBase();
            host.Create("a", new LoraSharp.Adapters.AdapterConfig { Rank = 4, Alpha = 8, Init = LoraSharp.Adapters.LoraInit.Gaussian }, LoraSharp.Adapters.ModuleSelector.Glob("model.*"));
            using (torch.no_grad()) foreach (var p in host.TrainableParameters()) p.normal_(0, 0.1); // up ≠ 0 so every path carries gradient
            using var ids = torch.tensor(new long[] { 1, 17, 42, 99, 200, 3, 7, 128, 1, 88, 5, 231, 64, 12, 150, 33 }, [2, 8]);
            using var logits = model.Logits(ids);
            using var loss = logits.pow(2).mean();
            loss.backward();
            grads.Add(host.NamedTrainableParameters().ToDictionary(p => p.Name, p => p.Param.grad!.data<float>().ToArray()));
        }
        // 14 in forward; again in backward for every module whose input needs a gradient (all but layer 0's q, k, v).
        Assert.Equal(14 + 11, quant.Quantized.Dequantizations);
        foreach (var (name, g) in grads[0])
        {
            var r = grads[1][name];
            for (int i = 0; i < g.Length; i++) Assert.True(Math.Abs(g[i] - r[i]) <= 1e-5 + 1e-4 * Math.Abs(r[i]), $"{name}[{i}]: {g[i]} vs {r[i]}");
        }
    }
}
