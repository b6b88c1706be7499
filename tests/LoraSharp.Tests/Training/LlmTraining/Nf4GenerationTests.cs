using System.Runtime.InteropServices;
using LoraSharp.Models.Llama;
using LoraSharp.Quantization;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Training.Llm;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.LlmTraining;

/// <summary>generate-text --load-in-4bit: the NF4 base (QLoRA's) for inference, with adapters on top.</summary>
[Collection(TorchGlobalStateCollection.Name)]
public class Nf4GenerationTests
{
    static int Run(params string[] args) =>
        LoraSharp.Cli.CommandLine.Build().Parse(args).Invoke(new System.CommandLine.InvocationConfiguration { Output = new StringWriter(), Error = new StringWriter() });

    /// <summary>The float32 model with every decoder linear weight replaced by dequant(NF4(W)).</summary>
    static LlamaForCausalLM RoundTrippedModel()
    {
        var model = LlamaCheckpoint.Load(LlmTestModels.ReferenceModel);
        using var noGrad = no_grad();
        foreach (var (path, module) in model.named_modules())
        {
            if (module is not TorchSharp.Modules.Linear lin || !LlmModelLoader.IsQuantizable(path)) continue;
            using var w = lin.weight!.detach().contiguous();
            var q = Nf4.Quantize(MemoryMarshal.Cast<byte, float>(w.bytes), [lin.out_features, lin.in_features]);
            using var back = tensor(Nf4.Dequantize(q), [lin.out_features, lin.in_features]);
            lin.weight!.copy_(back);
        }
        return model;
    }

    [Fact]
    public void Nf4_base_generates_what_the_dequantized_weights_give_with_a_lora_on_top_and_refuses_dora()
    {
        var lora = ReferenceData.PathOf("llm", "adapters", "lora");
        using var nf4 = LlmModelLoader.Load(LlmTestModels.ReferenceModel, ScalarType.Float32, quantize: true);
        Assert.NotNull(nf4.Quantized);
        using var reference = RoundTrippedModel();
        using var nf4Host = LlmAdapters.Attach(nf4.Model, [(lora, 0.8)], nf4Base: true);
        using var refHost = LlmAdapters.Attach(reference, [(lora, 0.8)]);

        int[] prompt = [1, 15, 27, 3, 99, 42];
        using (var scope = NewDisposeScope())
        using (no_grad())
        {
            var ids = tensor(prompt.Select(i => (long)i).ToArray()).unsqueeze(0);
            var a = nf4.Model.call(ids, null);
            var b = reference.call(ids, null);
            double diff = (a - b).abs().max().item<float>();
            Assert.True(diff < 1e-4, $"NF4 logits differ from the dequantized model's by {diff}");
            // (the quantization itself is visible: the float32 base with the same LoRA gives other logits)
            using var original = LlamaCheckpoint.Load(LlmTestModels.ReferenceModel);
            using var originalHost = LlmAdapters.Attach(original, [(lora, 0.8)]);
            double error = (original.call(ids, null) - b).abs().max().item<float>();
            Assert.True(error > 100 * diff && error > 1e-3, $"NF4 changed the logits by only {error}");
        }
        // greedy generation with the KV cache: the same tokens
        var options = new GenerationOptions { MaxNewTokens = 12 };
        Assert.Equal(LlamaGenerator.GenerateAll(reference, prompt, options), LlamaGenerator.GenerateAll(nf4.Model, prompt, options));

        // DoRA needs full-precision weight norms: refused on the NF4 base, naming the adapter
        var dora = ReferenceData.PathOf("llm", "adapters", "dora");
        var e = Assert.Throws<LoraSharpException>(() => LlmAdapters.Attach(nf4.Model, [(dora, 1.0)], nf4Base: true).Dispose());
        Assert.Contains("DoRA", e.Message);
        Assert.Equal(Path.GetFullPath(dora), Path.GetFullPath(e.FilePath!));

        // the command
        Assert.Equal(0, Run("generate-text", "--model", LlmTestModels.ReferenceModel, "--load-in-4bit", "--adapter", lora + ":0.8", "--prompt", "item 3", "--max-new-tokens", "4"));
        Assert.NotEqual(0, Run("generate-text", "--model", LlmTestModels.ReferenceModel, "--load-in-4bit", "--adapter", dora, "--prompt", "item 3", "--max-new-tokens", "4"));
    }
}
