using LoraSharp.Adapters;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static LoraSharp.Tests.Adapters.TestTrees;

namespace LoraSharp.Tests.Adapters;

/// <summary>Autograd gradients of every algorithm's parameters against central finite differences, in float64.</summary>
public class GradientTests
{
    public static TheoryData<string, string> Cases()
    {
        var d = new TheoryData<string, string>();
        foreach (var layer in new[] { "linear", "conv" })
            foreach (var algo in new[] { "lora", "lora_rs", "loha", "lokr", "lokr_both", "full", "full_dora", "dora_peft", "dora_scale", "dylora" })
                d.Add(layer, algo);
        foreach (var algo in new[] { "locon_tucker", "loha_tucker", "lokr_tucker", "dora_peft_conv_tucker" })
            d.Add("conv", algo);
        return d;
    }

    internal static AdapterConfig Config(string algo) => (algo switch
    {
        "lora" => new AdapterConfig { Rank = 3, Alpha = 2 },
        "lora_rs" => new() { Rank = 3, Alpha = 2, RsLora = true, Init = LoraInit.Gaussian },
        "locon_tucker" => new() { Rank = 2, Alpha = 1, UseTucker = true },
        "loha" => new() { Algorithm = AdapterAlgorithm.LoHa, Rank = 2, Alpha = 1 },
        "loha_tucker" => new() { Algorithm = AdapterAlgorithm.LoHa, Rank = 2, Alpha = 1, UseTucker = true },
        "lokr" => new() { Algorithm = AdapterAlgorithm.LoKr, Rank = 1, Alpha = 1 },
        "lokr_both" => new() { Algorithm = AdapterAlgorithm.LoKr, Rank = 1, Alpha = 3, DecomposeBoth = true },
        "lokr_tucker" => new() { Algorithm = AdapterAlgorithm.LoKr, Rank = 1, Alpha = 1, UseTucker = true },
        "full" => new() { Algorithm = AdapterAlgorithm.Full },
        "full_dora" => new() { Algorithm = AdapterAlgorithm.Full, Dora = DoraKind.DoraScale },
        "dora_peft" => new() { Rank = 2, Alpha = 4, Dora = DoraKind.Peft },
        "dora_peft_conv_tucker" => new() { Rank = 2, Alpha = 4, Dora = DoraKind.Peft, UseTucker = true },
        "dora_scale" => new() { Algorithm = AdapterAlgorithm.LoHa, Rank = 2, Alpha = 2, Dora = DoraKind.DoraScale },
        "dylora" => new() { Rank = 4, Alpha = 4, DyLoraUnit = 2 },
        _ => throw new ArgumentException(algo),
    }) with { DType = float64 };

    internal static (Node Root, nn.Module<Tensor, Tensor> Layer, Tensor X) Setup(string layer)
    {
        manual_seed(5);
        nn.Module leaf = layer == "linear"
            ? nn.Linear(16, 12, hasBias: true, dtype: float64)
            : nn.Conv2d(8, 12, 3, stride: 2, padding: 1, dtype: float64);
        var root = Build([("block.layer", leaf)]);
        var x = layer == "linear" ? randn(2, 3, 16, dtype: float64) : randn(2, 8, 7, 7, dtype: float64);
        return (root, (nn.Module<Tensor, Tensor>)leaf, x);
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Adapter_parameter_gradients_match_finite_differences(string layer, string algo)
    {
        using var scope = NewDisposeScope();
        var (root, module, x) = Setup(layer);
        using var host = new AdapterHost(root);
        var a = host.Create("t", Config(algo), ModuleSelector.Exact("block.layer"));
        host.FreezeBase();
        var adapter = a.Modules.Single();
        adapter.DetachDoraNorm = false; // exact gradient of the forward (the detached variant is tested below)
        if (adapter is DyLoraAdapter dy) dy.TrainableRankOverride = 2;
        using (no_grad())
            foreach (var (name, p) in adapter.Parameters)
                p.copy_(name is "magnitude" or "dora_scale" ? p.mul(rand_like(p).add(0.5)) : randn_like(p).mul(0.4));
        a.Multiplier = 0.8;
        root.train();
        var r = randn_like(module.call(x).detach());
        Tensor Loss() => module.call(x).mul(r).sum();

        Loss().backward();
        Assert.All(root.parameters(), p => Assert.Null(p.grad));
        var trainable = host.TrainableParameters();
        Assert.DoesNotContain(trainable, p => root.parameters().Any(b => b.Handle == p.Handle));

        int checkedCount = 0;
        foreach (var (name, p) in adapter.Parameters)
        {
            if (adapter is DyLoraAdapter && !name.EndsWith("_1"))
            {
                Assert.True(p.grad is null || p.grad.abs().max().item<double>() == 0, $"{name}: DyLoRA block outside [b, b+unit) got a gradient");
                continue;
            }
            Assert.NotNull(p.grad);
            var grad = p.grad!.detach().clone().flatten();
            var flat = p.detach().view(-1);
            long n = flat.numel();
            var idx = n <= 8 ? Enumerable.Range(0, (int)n).Select(i => (long)i) : randperm(n).narrow(0, 0, 8).data<long>().ToArray();
            foreach (var i in idx)
            {
                const double h = 1e-6;
                double orig = flat[i].item<double>();
                double lp, lm;
                using (no_grad())
                {
                    flat[i] = orig + h; lp = Loss().item<double>();
                    flat[i] = orig - h; lm = Loss().item<double>();
                    flat[i] = orig;
                }
                double fd = (lp - lm) / (2 * h), ag = grad[i].item<double>();
                Assert.True(Math.Abs(fd - ag) <= 1e-6 + 1e-5 * Math.Abs(fd), $"{algo}/{layer} {name}[{i}]: autograd {ag} vs finite difference {fd}");
                checkedCount++;
            }
        }
        Assert.True(checkedCount > 0);
    }

    [Fact]
    public void Peft_dora_with_detached_norm_has_the_exact_magnitude_gradient()
    {
        using var scope = NewDisposeScope();
        var (root, module, x) = Setup("linear");
        using var host = new AdapterHost(root);
        var a = host.Create("t", Config("dora_peft"), ModuleSelector.Exact("block.layer"));
        host.FreezeBase();
        var adapter = a.Modules.Single();
        Assert.True(adapter.DetachDoraNorm);
        using (no_grad()) foreach (var (_, p) in adapter.Parameters) p.add_(randn_like(p).mul(0.3));
        var r = randn_like(module.call(x).detach());
        Tensor Loss() => module.call(x).mul(r).sum();
        Loss().backward();
        var mag = adapter.DoraMagnitude!;
        var flat = mag.detach().view(-1);
        for (int i = 0; i < 4; i++)
        {
            const double h = 1e-6;
            double orig = flat[i].item<double>(), lp, lm;
            using (no_grad()) { flat[i] = orig + h; lp = Loss().item<double>(); flat[i] = orig - h; lm = Loss().item<double>(); flat[i] = orig; }
            Assert.Equal((lp - lm) / (2 * h), mag.grad![i].item<double>(), 6);
        }
    }

    [Theory]
    [MemberData(nameof(Cases))]
    public void Merged_forward_equals_unmerged_forward(string layer, string algo)
    {
        using var scope = NewDisposeScope();
        var (root, module, x) = Setup(layer);
        using var host = new AdapterHost(root);
        var a = host.Create("t", Config(algo), ModuleSelector.Exact("block.layer"));
        using (no_grad())
            foreach (var (name, p) in a.Modules[0].Parameters)
                p.copy_(name is "magnitude" or "dora_scale" ? p.mul(rand_like(p).add(0.5)) : randn_like(p).mul(0.4));
        root.eval();
        foreach (var m in new[] { 1.0, 0.7 })
        {
            a.Multiplier = m;
            var unmerged = module.call(x).detach();
            host.Merge();
            var merged = module.call(x).detach();
            host.Unmerge();
            Assert.True(MaxAbs(merged, unmerged) < 1e-9, $"{algo}/{layer} m={m}: {MaxAbs(merged, unmerged):G3}");
        }
    }

    [Theory]
    [InlineData("linear")]
    [InlineData("conv")]
    public void In_place_accumulation_gives_the_same_outputs_and_leaves_gradients_as_accumulating_into_a_copy(string layer)
    {
        using var scope = NewDisposeScope();
        (Tensor Out, Tensor[] Grads) Run(bool inPlace)
        {
            var (root, module, x) = Setup(layer);
            using var host = new AdapterHost(root) { InPlaceAccumulation = inPlace };
            host.FreezeBase();
            var a = host.Create("a", Config("lora"), ModuleSelector.Exact("block.layer"));
            var b = host.Create("b", Config("loha"), ModuleSelector.Exact("block.layer"));
            manual_seed(11);
            using (no_grad()) foreach (var p in host.TrainableParameters()) p.copy_(randn_like(p).mul(0.3));
            a.Multiplier = 0.7; b.Multiplier = -0.4;
            root.train();
            Tensor inferred;
            using (no_grad()) inferred = module.call(x).detach().clone(); // the in-place path (no autograd)
            var xi = x.detach().requires_grad_(true);
            var y = module.call(xi);
            Assert.True(MaxAbs(inferred, y) < 1e-12);
            // the output feeds a nonlinearity that saves its input, and is used twice
            var loss = y.tanh().sum() + y.square().mean();
            loss.backward();
            return (y.detach().clone(), [xi.grad!.clone(), .. host.TrainableParameters().Select(p => p.grad!.clone())]);
        }
        var (outCopy, gradCopy) = Run(false);
        var (outInPlace, gradInPlace) = Run(true);
        Assert.True(MaxAbs(outCopy, outInPlace) < 1e-12);
        Assert.Equal(gradCopy.Length, gradInPlace.Length);
        Assert.True(gradCopy.Length >= 7); // input + 2 LoRA + 4 LoHa factors
        for (int i = 0; i < gradCopy.Length; i++)
        {
            Assert.True(gradCopy[i].abs().max().item<double>() > 0, $"gradient {i} is zero: the comparison would prove nothing");
            Assert.True(MaxAbs(gradCopy[i], gradInPlace[i]) < 1e-12, $"gradient {i} differs");
        }
    }
}
