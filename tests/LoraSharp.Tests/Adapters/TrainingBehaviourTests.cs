using LoraSharp.Adapters;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;
using static LoraSharp.Tests.Adapters.TestTrees;

namespace LoraSharp.Tests.Adapters;

/// <summary>Tests that replay torch's global random generator run alone (a parallel test would consume numbers).</summary>
[Collection(SerialAdapterTests.Name)]
public class TrainingBehaviourTests
{
    static (Node Root, Linear Layer) OneLinear(long inF = 10, long outF = 6)
    {
        manual_seed(1);
        var lin = nn.Linear(inF, outF);
        return (Build([("layer", lin)]), lin);
    }

    static void Randomize(Adapter a)
    {
        using var _ = no_grad();
        foreach (var (_, p) in a.Parameters) p.copy_(randn_like(p).mul(0.5));
    }

    [Fact]
    public void Dropouts_act_only_in_training()
    {
        using var scope = NewDisposeScope();
        var (root, lin) = OneLinear();
        using var host = new AdapterHost(root);
        var a = host.Create("t", new AdapterConfig { Rank = 4, Dropout = new() { Input = 0.3, Network = 0.3, Rank = 0.3, Module = 0.3 } },
            ModuleSelector.Exact("layer"));
        Randomize(a.Modules[0]);
        var x = randn(5, 10);
        root.eval();
        var y1 = lin.call(x).detach();
        var y2 = lin.call(x).detach();
        Assert.True(Same(y1, y2));
        a.Modules[0].Dropout = AdapterDropout.None;
        Assert.True(MaxAbs(lin.call(x), y1) < 1e-6);
        a.Modules[0].Dropout = new() { Input = 0.3 };
        root.train();
        Assert.True(MaxAbs(lin.call(x), y1) > 1e-4);
    }

    [Fact]
    public void Kohya_rank_dropout_masks_batch_by_rank_and_rescales()
    {
        using var scope = NewDisposeScope();
        var (root, lin) = OneLinear();
        using var host = new AdapterHost(root);
        var a = host.Create("t", new AdapterConfig { Rank = 4, Alpha = 2, Dropout = new() { Rank = 0.5 } }, ModuleSelector.Exact("layer"));
        var lora = (LoraAdapter)a.Modules[0];
        Randomize(lora);
        root.train();
        var x = randn(3, 7, 10); // batch 3, 7 tokens
        var y0 = lin.forward(x).detach(); // forward() bypasses hooks: the base output
        manual_seed(77);
        var mask = rand(3, 4).gt(0.5).to(float32);
        manual_seed(77);
        var y = lin.call(x).detach();
        var h = x.matmul(lora.Down.detach().t()).mul(mask.unsqueeze(1));
        var expect = y0.add(h.matmul(lora.Up.detach().t()).mul(0.5 / (1 - 0.5)));
        Assert.True(MaxAbs(y, expect) < 1e-5);
    }

    [Fact]
    public void Lycoris_rank_dropout_masks_output_rows_of_delta_weight()
    {
        using var scope = NewDisposeScope();
        var (root, lin) = OneLinear(10, 32);
        using var host = new AdapterHost(root);
        var a = host.Create("t", new AdapterConfig { Algorithm = AdapterAlgorithm.LoHa, Rank = 2, Dropout = new() { Rank = 0.5 } }, ModuleSelector.Exact("layer"));
        Randomize(a.Modules[0]);
        var x = randn(4, 10);
        root.eval();
        var full = lin.call(x).detach();
        var y0 = lin.forward(x).detach();
        root.train();
        var y = lin.call(x).detach();
        int dropped = 0, kept = 0;
        for (int o = 0; o < 32; o++)
        {
            var col = y[.., o];
            if (MaxAbs(col, y0[.., o]) < 1e-6) dropped++;
            else { Assert.True(MaxAbs(col, full[.., o]) < 1e-5, $"row {o} neither dropped nor kept"); kept++; }
        }
        Assert.True(dropped > 0 && kept > 0);
    }

    [Fact]
    public void Module_dropout_skips_the_whole_adapter()
    {
        using var scope = NewDisposeScope();
        var (root, lin) = OneLinear();
        using var host = new AdapterHost(root);
        var a = host.Create("t", new AdapterConfig { Rank = 2, Dropout = new() { Module = 0.5 } }, ModuleSelector.Exact("layer"));
        Randomize(a.Modules[0]);
        var x = randn(2, 10);
        var y0 = lin.forward(x).detach();
        root.eval();
        var full = lin.call(x).detach();
        root.train();
        int skipped = 0, applied = 0;
        for (int i = 0; i < 40; i++)
        {
            var y = lin.call(x).detach();
            if (Same(y, y0)) skipped++;
            else { Assert.True(MaxAbs(y, full) < 1e-6); applied++; }
        }
        Assert.InRange(skipped, 5, 35);
        Assert.InRange(applied, 5, 35);
    }

    [Fact]
    public void Dylora_trains_one_block_per_step_with_the_rank_scale_and_is_plain_lora_in_eval()
    {
        using var scope = NewDisposeScope();
        var (root, lin) = OneLinear();
        using var host = new AdapterHost(root);
        host.FreezeBase();
        var a = host.Create("t", new AdapterConfig { Rank = 6, Alpha = 3, DyLoraUnit = 2 }, ModuleSelector.Exact("layer"));
        var dy = (DyLoraAdapter)a.Modules[0];
        Randomize(dy);
        var x = randn(4, 10);
        var y0 = lin.forward(x).detach();
        using var w = dy.ToWeights();
        var full = w["lora_up"].matmul(w["lora_down"]).mul(0.5); // s = alpha/r = 0.5
        root.eval();
        Assert.True(MaxAbs(lin.call(x), y0.add(x.matmul(full.t()))) < 1e-5);

        root.train();
        dy.TrainableRankOverride = 3; // rounds down to 2 → block 1, scale × √(6/4)
        var y = lin.call(x);
        Assert.Equal(2, dy.LastTrainableRank);
        Assert.True(MaxAbs(y, y0.add(x.matmul(full.t()).mul(Math.Sqrt(6.0 / 4)))) < 1e-5);

        var before = dy.Parameters.ToDictionary(p => p.Name, p => p.Param.detach().clone());
        var opt = optim.AdamW(host.TrainableParameters(), 0.1);
        opt.zero_grad();
        y.square().sum().backward();
        opt.step();
        foreach (var (name, p) in dy.Parameters)
        {
            bool changed = !Same(p, before[name]);
            Assert.Equal(name.EndsWith("_1"), changed);
        }
        // next step trains block 0: block 1 must stay put although the optimizer has state for it
        opt.zero_grad();
        dy.TrainableRankOverride = 0;
        before = dy.Parameters.ToDictionary(p => p.Name, p => p.Param.detach().clone());
        lin.call(x).square().sum().backward();
        opt.step();
        foreach (var (name, p) in dy.Parameters)
            Assert.Equal(name.EndsWith("_0"), !Same(p, before[name]));

        // truncation of the exported weights to rank 2 gives the first block only
        using var exported = dy.ToWeights();
        using var cut = DyLoraMath.Truncate(exported, 2);
        Assert.True(Same(cut["lora_down"], exported["lora_down"][..2]));
        Assert.Equal(exported.Alpha, cut.Alpha);
    }

    [Fact]
    public void Bf16_inputs_use_the_fp32_adapter_and_return_the_input_dtype()
    {
        using var scope = NewDisposeScope();
        manual_seed(2);
        var lin = nn.Linear(16, 8, dtype: bfloat16);
        var root = Build([("l", lin)]);
        using var host = new AdapterHost(root);
        var a = host.Create("t", new AdapterConfig { Rank = 2 }, ModuleSelector.All());
        Randomize(a.Modules[0]);
        var x = randn(3, 16).to(bfloat16);
        var y = lin.call(x);
        Assert.Equal(bfloat16, y.dtype);
        a.Modules[0].ComputeDType = bfloat16;
        Assert.Equal(bfloat16, lin.call(x).dtype);
        y.to(float32).sum().backward();
        Assert.Equal(float32, host.TrainableParameters()[0].grad!.dtype);
    }
}
