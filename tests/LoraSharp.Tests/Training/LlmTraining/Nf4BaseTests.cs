using System.Runtime.InteropServices;
using LoraSharp.Adapters;
using LoraSharp.Models.Llama;
using LoraSharp.Quantization;
using LoraSharp.Tests.Infrastructure;
using LoraSharp.Training.Llm;
using TorchSharp;
using static TorchSharp.torch;

namespace LoraSharp.Tests.Training.LlmTraining;

/// <summary>The NF4 base (QLoRA's) with adapters on top: generate-text --load-in-4bit, and DoRA on it (inference and training).</summary>
[Collection(TorchGlobalStateCollection.Name)]
public class Nf4BaseTests
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
    public void Nf4_base_generates_what_the_dequantized_weights_give_with_a_lora_or_dora_on_top()
    {
        var lora = ReferenceData.PathOf("llm", "adapters", "lora");
        using var nf4 = LlmModelLoader.Load(LlmTestModels.ReferenceModel, ScalarType.Float32, quantize: true);
        Assert.NotNull(nf4.Quantized);
        using var reference = RoundTrippedModel();
        using var nf4Host = LlmAdapters.Attach(nf4.Model, [(lora, 0.8)], nf4.Quantized);
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

        // DoRA on the NF4 base: its norms come from this module's dequantized weight, as on the dequantized model
        var dora = ReferenceData.PathOf("llm", "adapters", "dora");
        nf4Host.Dispose();
        refHost.Dispose();
        using (var nf4Dora = LlmAdapters.Attach(nf4.Model, [(dora, 1.0)], nf4.Quantized))
        using (var refDora = LlmAdapters.Attach(reference, [(dora, 1.0)]))
        using (var scope = NewDisposeScope())
        using (no_grad())
        {
            var ids = tensor(prompt.Select(i => (long)i).ToArray()).unsqueeze(0);
            double diff = (nf4.Model.call(ids, null) - reference.call(ids, null)).abs().max().item<float>();
            Assert.True(diff < 1e-4, $"DoRA on NF4 differs from DoRA on the dequantized model by {diff}");
            Assert.Throws<InvalidOperationException>(() => nf4Dora.Merge());
        }

        // the command
        Assert.Equal(0, Run("generate-text", "--model", LlmTestModels.ReferenceModel, "--load-in-4bit", "--adapter", lora + ":0.8", "--prompt", "item 3", "--max-new-tokens", "4"));
        Assert.Equal(0, Run("generate-text", "--model", LlmTestModels.ReferenceModel, "--load-in-4bit", "--adapter", dora, "--prompt", "item 3", "--max-new-tokens", "4"));
    }

    /// <summary>
    /// QLoRA + DoRA (PEFT's use_dora on a 4-bit base): the magnitude starts from the dequantized weights and a training
    /// step (input dropout on, so DoRA recomputes the base product from its copy of the weight) gives the loss and the
    /// gradient of every adapter parameter of the same DoRA on the dequantized float32 model.
    /// </summary>
    [Fact]
    public void Dora_trains_on_the_nf4_base_with_the_gradients_of_the_dequantized_model()
    {
        using var nf4 = LlmModelLoader.Load(LlmTestModels.ReferenceModel, ScalarType.Float32, quantize: true);
        using var reference = RoundTrippedModel();
        var config = new AdapterConfig
        {
            Rank = 4, Alpha = 8, Dora = DoraKind.Peft, Dropout = new AdapterDropout { Input = 0.1 }, Convention = ScaleConvention.Peft, DType = ScalarType.Float32,
        };
        AdapterHost Make(LlamaForCausalLM m, Nf4Linears? q)
        {
            var h = new AdapterHost(m);
            if (q is not null) h.DequantizedWeight = q.Dequantize;
            h.FreezeBase();
            manual_seed(3);
            h.Create("dora", config, ModuleSelector.Glob("*").ExcludeExact("lm_head"));
            return h;
        }
        using var hq = Make(nf4.Model, nf4.Quantized);
        using var hr = Make(reference, null);
        var pq = hq.NamedTrainableParameters();
        var pr = hr.NamedTrainableParameters();
        Assert.Equal(pr.Select(p => p.Name), pq.Select(p => p.Name));
        Assert.Contains(pq, p => p.Name.EndsWith("/magnitude", StringComparison.Ordinal));
        using (no_grad())
        {
            foreach (var ((name, a), (_, b)) in pq.Zip(pr))
                Assert.True((a - b).abs().max().item<float>() < 1e-5, $"{name} starts differently");
            // move every parameter off its initial value (B = 0 would hide the DoRA ratio's gradient)
            manual_seed(4);
            foreach (var ((_, a), (_, b)) in pq.Zip(pr))
            {
                using var r = randn_like(a) * 0.05;
                a.add_(r);
                b.add_(r);
            }
        }
        double Step(LlamaForCausalLM m)
        {
            m.train();
            manual_seed(5);
            using var scope = NewDisposeScope();
            var ids = tensor(new long[] { 1, 15, 27, 3, 99, 42, 7, 8 }).unsqueeze(0);
            var logits = m.call(ids, null);
            var loss = nn.functional.cross_entropy(logits[0, ..^1], ids[0, 1..]);
            loss.backward();
            return loss.item<float>();
        }
        double lq = Step(nf4.Model), lr = Step(reference);
        Assert.True(Math.Abs(lq - lr) < 1e-5, $"loss {lq} vs {lr}");
        foreach (var ((name, a), (_, b)) in pq.Zip(pr))
        {
            Assert.NotNull(b.grad);
            double scale = Math.Max(1e-3, b.grad!.abs().max().item<float>());
            double diff = (a.grad! - b.grad!).abs().max().item<float>();
            Assert.True(diff < 1e-4 * scale + 1e-7, $"{name}: gradient differs by {diff} (max |g| {scale})");
        }
    }
}
